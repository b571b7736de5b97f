//! IoT Hub device-side topic handling, independent of the socket: what a hub connection does with
//! each PUBLISH a device sends (telemetry with its property bag, twin GET/PATCH, method answers)
//! and how the hub authenticates a CONNECT. Called by `mqtt`.
//! OWNER: hubsim-mqtt helper.
