"""Azure's own Python device SDK (azure-iot-device 2.14.0) against hubsim: if these pass, hubsim
speaks the protocol the real services speak, as the real SDK understands it."""

import json
import queue
import threading
import uuid

import pytest
from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse, ProvisioningDeviceClient
from azure.iot.device.exceptions import CredentialError

from conftest import HUB, HUB_ADDRESS, derive_device_key

TIMEOUT = 30


def provision(hubsim, registration_id, key, websockets=False):
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host="localhost",
        registration_id=registration_id,
        id_scope=hubsim["id_scope"],
        symmetric_key=key,
        server_verification_cert=hubsim["ca_pem"],
        websockets=websockets,
    )
    return client.register()


def enroll(hubsim, registration_id, hub=HUB):
    enrollment = hubsim["api"].request(
        "PUT",
        f"/enrollments/{registration_id}",
        policy="dps",
        body={"registrationId": registration_id, "attestation": {"type": "symmetricKey"},
              "allocationPolicy": "static", "iotHubHostName": hub},
        expect=200,
    )
    return enrollment["attestation"]["symmetricKey"]["primaryKey"]


def hub_client(hubsim, result, key, gateway=HUB_ADDRESS, websockets=False):
    """The assigned hub's client; the hub's name does not resolve, so the SDK dials its address
    (`gateway_hostname`) and still names the hub in its username and SAS."""
    client = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=key,
        hostname=result.registration_state.assigned_hub,
        device_id=result.registration_state.device_id,
        server_verification_cert=hubsim["ca_pem"],
        gateway_hostname=gateway,
        websockets=websockets,
    )
    client.connect()
    return client


@pytest.fixture
def device(hubsim):
    """An enrolled, provisioned, connected device."""
    registration_id = f"py-{uuid.uuid4().hex[:8]}"
    key = enroll(hubsim, registration_id)
    result = provision(hubsim, registration_id, key)
    client = hub_client(hubsim, result, key)
    yield registration_id, client
    client.shutdown()


def test_the_hub_is_not_reachable_at_the_dps_endpoint(hubsim):
    # DPS and the hub are different hosts: a device that dials DPS's endpoint for its hub is
    # refused there (CONNACK 5), as DPS would refuse a hub's username.
    key = enroll(hubsim, "py-wrong-host")
    result = provision(hubsim, "py-wrong-host", key)
    with pytest.raises(CredentialError) as refused:
        hub_client(hubsim, result, key, gateway="localhost")
    assert "not authorised" in str(refused.value.__cause__), repr(refused.value.__cause__)
    events = hubsim["api"].request("GET", "/sim/connections", expect=200)
    reasons = [e["reason"] for e in events if e["clientId"] == "py-wrong-host" and e["event"] == "refused"]
    assert reasons and "reached the DPS endpoint" in reasons[-1], reasons


def test_individual_symmetric_key_registration(hubsim):
    key = enroll(hubsim, "py-individual")
    hubsim["api"].request("PUT", "/enrollments/py-individual", policy="dps", expect=200, body={
        "registrationId": "py-individual", "deviceId": "gateway-7", "iotHubHostName": HUB,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}},
    })
    result = provision(hubsim, "py-individual", key)
    assert result.status == "assigned"
    assert result.registration_state.assigned_hub == HUB
    assert result.registration_state.device_id == "gateway-7"
    assert result.registration_state.sub_status == "initialAssignment"
    history = hubsim["api"].request("GET", "/sim/registrations", expect=200)
    mine = [h for h in history if h["registrationId"] == "py-individual"]
    assert mine[-1]["outcome"] == "assigned" and mine[-1]["transport"] == "mqtt"
    state = hubsim["api"].request("GET", "/registrations/py-individual", policy="dps", expect=200)
    assert state["deviceId"] == "gateway-7"


def test_slow_assignment_and_throttled_polls_are_waited_out(hubsim):
    """DPS assigning asynchronously: polls answered 202 `assigning` and 429, each with retry-after;
    Azure's SDK polls on and is assigned."""
    key = enroll(hubsim, "py-slow")
    hubsim["api"].request("POST", "/sim/faults", expect=204, body={
        "dpsAssigning": {"polls": 2, "retryAfter": 1},
        "dpsThrottle": {"count": 1, "retryAfter": 1, "requests": "poll"},
    })
    try:
        result = provision(hubsim, "py-slow", key)
    finally:
        hubsim["api"].request("DELETE", "/sim/faults", expect=204)
    assert result.status == "assigned"
    assert result.registration_state.device_id == "py-slow"
    history = hubsim["api"].request("GET", "/sim/registrations", expect=200)
    mine = [h for h in history if h["registrationId"] == "py-slow"]
    assert [p["status"] for p in mine[-1]["polls"]] == [429, 202, 202, 200]


def test_group_enrollment_with_derived_key(hubsim):
    group = hubsim["api"].request("PUT", "/enrollmentGroups/py-fleet", policy="dps", expect=200, body={
        "enrollmentGroupId": "py-fleet", "attestation": {"type": "symmetricKey"}, "iotHubHostName": HUB,
    })
    group_key = group["attestation"]["symmetricKey"]["primaryKey"]
    result = provision(hubsim, "py-fleet-dev-1", derive_device_key(group_key, "py-fleet-dev-1"))
    assert result.status == "assigned"
    assert result.registration_state.device_id == "py-fleet-dev-1"


def test_custom_payload_is_echoed(hubsim):
    key = enroll(hubsim, "py-payload")
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host="localhost", registration_id="py-payload", id_scope=hubsim["id_scope"],
        symmetric_key=key, server_verification_cert=hubsim["ca_pem"],
    )
    client.provisioning_payload = {"modelId": "dtmi:example:gateway;1"}
    result = client.register()
    # The SDK hands the echoed payload back as JSON text.
    assert json.loads(result.registration_state.response_payload) == {"modelId": "dtmi:example:gateway;1"}


def test_the_sdk_model_id_shows_in_the_device_and_twin(hubsim):
    # The SDK announces a Plug and Play model when product_info is a DTMI: `model-id=` in the
    # CONNECT username (api-version 2020-09-30), which the hub shows as the twin's `modelId`.
    registration_id = f"py-pnp-{uuid.uuid4().hex[:6]}"
    key = enroll(hubsim, registration_id)
    result = provision(hubsim, registration_id, key)
    client = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=key,
        hostname=result.registration_state.assigned_hub,
        device_id=result.registration_state.device_id,
        server_verification_cert=hubsim["ca_pem"],
        gateway_hostname=HUB_ADDRESS,
        product_info="dtmi:example:gateway;1",
    )
    client.connect()
    try:
        twin = hubsim["api"].request("GET", f"/twins/{registration_id}", expect=200)
        device = hubsim["api"].request("GET", f"/devices/{registration_id}", expect=200)
        assert twin["modelId"] == "dtmi:example:gateway;1", twin
        assert device["modelId"] == "dtmi:example:gateway;1", device
    finally:
        client.shutdown()


def test_wrong_key_is_refused(hubsim):
    enroll(hubsim, "py-wrong")
    # The refusal itself: CONNACK 5 (not authorized), which the SDK reports as a CredentialError
    # (not a network failure or a timeout, which would also be "an exception").
    with pytest.raises(CredentialError) as refused:
        provision(hubsim, "py-wrong", derive_device_key("AAAA" * 11, "x"))
    assert "not authorised" in str(refused.value.__cause__), repr(refused.value.__cause__)
    events = hubsim["api"].request("GET", "/sim/connections", expect=200)
    assert any(e["clientId"] == "py-wrong" and e["event"] == "refused" for e in events)


def test_telemetry_with_properties(hubsim, device):
    device_id, client = device
    message = Message('{"temperature": 21.5}', message_id="m-1", content_encoding="utf-8",
                      content_type="application/json")
    message.custom_properties["alert"] = "high temp"
    client.send_message(message)  # returns once the hub's PUBACK arrived
    records = hubsim["api"].request("GET", f"/sim/telemetry/{device_id}", expect=200)
    assert len(records) == 1
    record = records[0]
    assert record["body"] == '{"temperature": 21.5}'
    assert record["properties"] == {"alert": "high temp"}
    assert record["systemProperties"]["message-id"] == "m-1"
    assert record["systemProperties"]["content-type"] == "application/json"
    assert record["systemProperties"]["content-encoding"] == "utf-8"


def test_twin_reported_and_desired(hubsim, device):
    device_id, client = device
    before = client.get_twin()
    client.patch_twin_reported_properties({"firmware": "1.2.3"})
    after = client.get_twin()
    assert after["reported"]["firmware"] == "1.2.3"
    assert after["reported"]["$version"] == before["reported"]["$version"] + 1

    patches = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put
    twin = hubsim["api"].request("PATCH", f"/twins/{device_id}", expect=200,
                                 body={"properties": {"desired": {"interval": 10}}})
    patch = patches.get(timeout=TIMEOUT)
    assert patch["interval"] == 10
    assert patch["$version"] == twin["properties"]["desired"]["$version"]
    service_view = hubsim["api"].request("GET", f"/twins/{device_id}", expect=200)
    assert service_view["properties"]["reported"]["firmware"] == "1.2.3"


def test_direct_method_round_trip(hubsim, device):
    device_id, client = device

    def on_method(request):
        client.send_method_response(
            MethodResponse.create_from_method_request(request, 200, {"echo": request.payload, "name": request.name}))

    client.on_method_request_received = on_method
    answer = hubsim["api"].request("POST", f"/twins/{device_id}/methods", expect=200, body={
        "methodName": "reboot", "payload": {"delay": 5}, "responseTimeoutInSeconds": TIMEOUT,
    })
    assert answer == {"status": 200, "payload": {"echo": {"delay": 5}, "name": "reboot"}}


def test_method_to_an_offline_device_is_404(hubsim):
    key = enroll(hubsim, "py-offline")
    provision(hubsim, "py-offline", key)
    hubsim["api"].request("POST", "/twins/py-offline/methods", expect=404,
                          body={"methodName": "x", "payload": None})


def test_cloud_to_device_message(hubsim, device):
    device_id, client = device
    received = queue.Queue()
    client.on_message_received = received.put
    hubsim["api"].request("POST", f"/messages/deviceBound/{device_id}", expect=204, body={
        "body": "open the valve", "messageId": "c2d-1", "contentType": "text/plain",
        "properties": {"color": "red"},
    })
    message = received.get(timeout=TIMEOUT)
    assert message.data == b"open the valve"
    assert message.message_id == "c2d-1"
    assert message.content_type == "text/plain"
    assert message.custom_properties == {"color": "red"}


def test_dropped_connection_is_recovered_by_the_sdk(hubsim, device):
    device_id, client = device
    connected_again = threading.Event()
    seen_disconnect = threading.Event()

    def on_state_change():
        # Armed before the drop, so a reconnect faster than the HTTP answer is not missed.
        if not client.connected:
            seen_disconnect.set()
        elif seen_disconnect.is_set():
            connected_again.set()

    client.on_connection_state_change = on_state_change
    dropped = hubsim["api"].request("POST", f"/sim/faults/drop/{device_id}", expect=200)["dropped"]
    assert dropped == 1
    assert connected_again.wait(TIMEOUT), "the SDK did not reconnect"
    client.send_message(Message("after the drop"))
    records = hubsim["api"].request("GET", f"/sim/telemetry/{device_id}", expect=200)
    assert records[-1]["body"] == "after the drop"


def test_mqtt_over_websockets_on_443(hubsim):
    """`websockets=True`: the SDK dials port 443 and speaks MQTT inside a WebSocket
    (`/$iothub/websocket`, subprotocol `mqtt`), for DPS and for the hub, as firewalls that only
    let HTTPS out require. hubsim records the route each connection took."""
    key = enroll(hubsim, "py-ws-1")
    result = provision(hubsim, "py-ws-1", key, websockets=True)
    assert result.status == "assigned"
    history = hubsim["api"].request("GET", "/sim/registrations", expect=200)
    mine = [h for h in history if h["registrationId"] == "py-ws-1"]
    assert mine[-1]["outcome"] == "assigned" and mine[-1]["transport"] == "mqtt-ws", mine
    client = hub_client(hubsim, result, key, websockets=True)
    client.send_message(Message("over websockets"))
    client.patch_twin_reported_properties({"route": "websockets"})
    hubsim["api"].request("PATCH", "/twins/py-ws-1", policy="hub", expect=200,
                          body={"properties": {"desired": {"interval": 5}}})
    twin = client.get_twin()
    client.shutdown()
    records = hubsim["api"].request("GET", "/sim/telemetry/py-ws-1", expect=200)
    assert [r["body"] for r in records] == ["over websockets"]
    assert twin["desired"]["interval"] == 5 and twin["reported"]["route"] == "websockets"
    events = hubsim["api"].request("GET", "/sim/connections", expect=200)
    connected = [(e["service"], e.get("transport")) for e in events
                 if e["clientId"] == "py-ws-1" and e["event"] == "connected"]
    assert connected == [("dps", "mqtt-ws"), ("hub", "mqtt-ws")], connected


def test_websocket_upgrade_without_the_mqtt_subprotocol_is_refused(hubsim):
    import http.client
    import ssl
    context = ssl.create_default_context(cadata=hubsim["ca_pem"])
    connection = http.client.HTTPSConnection(HUB_ADDRESS, 443, context=context, timeout=TIMEOUT)
    connection.request("GET", "/$iothub/websocket", headers={
        "Host": HUB, "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Protocol": "chat"})
    answer = connection.getresponse()
    body = answer.read().decode()
    assert answer.status == 400, (answer.status, body)
    assert "subprotocol 'mqtt'" in body, body
