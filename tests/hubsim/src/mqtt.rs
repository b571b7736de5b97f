//! The MQTT 3.1.1 over TLS listener that carries both DPS and hub traffic, told apart by the
//! CONNECT username. Packets are encoded/decoded with rumqttc's `mqttbytes::v4` codec.
//! OWNER: hubsim-mqtt helper.
