"""Azure's Python service SDK (azure-iot-hub) driving hubsim's management API, X.509 attestation
with the Python device SDK, and Azure's quickstart flow run unchanged against hubsim."""

import os
import queue
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse, ProvisioningDeviceClient, X509
from azure.iot.device.exceptions import CredentialError
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties
from msrest.exceptions import HttpOperationError

from conftest import HUB_ADDRESS, QUICKSTART_HUB, HUB
from test_python_sdk import TIMEOUT, enroll, hub_client, provision

HERE = Path(__file__).resolve().parent


@pytest.fixture
def registry(hubsim, monkeypatch):
    # The service SDK talks HTTPS through requests: trust hubsim's CA, and reach its HTTPS port.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", hubsim["ca_path"])
    # The hub's own name, at hubsim's HTTPS port (Azure's is 443): the SDK signs `sr` for it and
    # verifies the hub's certificate by it. The name is not in DNS here, so it resolves, for this
    # test only, to the address hubsim serves that hub on (as DNS would resolve the real hub's).
    real_getaddrinfo = socket.getaddrinfo

    def resolve_hub(host, *args, **kwargs):
        return real_getaddrinfo(HUB_ADDRESS if host == HUB else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve_hub)
    fields = dict(p.split("=", 1) for p in hubsim["hub_connection_string"].strip().split(";"))
    assert fields["HostName"] == HUB
    cs = hubsim["hub_connection_string"].replace(
        "HostName=%s" % fields["HostName"], "HostName=%s:%d" % (fields["HostName"], hubsim["https_port"]))
    return IoTHubRegistryManager.from_connection_string(cs)


def test_service_sdk_twin_and_method(hubsim, registry):
    key = enroll(hubsim, "py-svc-1")
    result = provision(hubsim, "py-svc-1", key)
    device = hub_client(hubsim, result, key)
    try:
        patches = queue.Queue()
        device.on_twin_desired_properties_patch_received = patches.put

        def on_method(request):
            device.send_method_response(MethodResponse.create_from_method_request(request, 200, {"ok": request.name}))

        device.on_method_request_received = on_method
        device.patch_twin_reported_properties({"firmware": "2.0"})

        twin = registry.get_twin("py-svc-1")
        assert twin.properties.reported["firmware"] == "2.0"
        updated = registry.update_twin("py-svc-1", Twin(properties=TwinProperties(desired={"interval": 7})), twin.etag)
        assert updated.properties.desired["interval"] == 7
        assert patches.get(timeout=TIMEOUT)["interval"] == 7
        # A stale etag is refused, as the hub does (optimistic concurrency).
        with pytest.raises(HttpOperationError) as stale:
            registry.update_twin("py-svc-1", Twin(properties=TwinProperties(desired={"interval": 9})), twin.etag)
        assert stale.value.response.status_code == 412, repr(stale.value)

        answer = registry.invoke_device_method(
            "py-svc-1", CloudToDeviceMethod(method_name="reboot", payload={"in": 1}, response_timeout_in_seconds=TIMEOUT))
        assert answer.status == 200
        assert answer.payload == {"ok": "reboot"}
    finally:
        device.shutdown()


def hubsim_certs(hubsim, tmp_path, *args):
    out = subprocess.run([str(hubsim["binary"]), "certs", *args], capture_output=True, text=True, check=True)
    return out.stdout


def first_certificate(path):
    text = Path(path).read_text()
    end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return text[:end] + "\n"


def register_x509(hubsim, registration_id, cert_dir):
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host="localhost", registration_id=registration_id, id_scope=hubsim["id_scope"],
        x509=X509(str(cert_dir / "cert.pem"), str(cert_dir / "key.pem")),
        server_verification_cert=hubsim["ca_pem"],
    )
    return client.register()


def test_x509_individual_enrollment(hubsim, tmp_path):
    dev = tmp_path / "dev"
    hubsim_certs(hubsim, tmp_path, "device", "--out", str(dev), "--cn", "py-x509-1")
    hubsim["api"].request("PUT", "/enrollments/py-x509-1", policy="dps", expect=200, body={
        "registrationId": "py-x509-1", "iotHubHostName": "sim-hub.example.net",
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": first_certificate(dev / "cert.pem")}}}},
    })
    result = register_x509(hubsim, "py-x509-1", dev)
    assert result.status == "assigned"
    device = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(str(dev / "cert.pem"), str(dev / "key.pem")), hostname=result.registration_state.assigned_hub,
        device_id=result.registration_state.device_id, server_verification_cert=hubsim["ca_pem"], gateway_hostname=HUB_ADDRESS)
    device.connect()
    device.send_message(Message("from an X.509 device"))
    device.shutdown()
    records = hubsim["api"].request("GET", "/sim/telemetry/py-x509-1", expect=200)
    assert records[0]["body"] == "from an X.509 device"
    assert '"type":"x509"' in records[0]["systemProperties"]["iothub-connection-auth-method"]


def test_x509_group_enrollment_and_a_foreign_certificate(hubsim, tmp_path):
    hubsim_certs(hubsim, tmp_path, "root", "--out", str(tmp_path / "root"), "--cn", "Py Fleet Root")
    hubsim_certs(hubsim, tmp_path, "device", "--out", str(tmp_path / "dev"), "--cn", "py-x509-grp-1", "--issuer", str(tmp_path / "root"))
    hubsim["api"].request("PUT", "/enrollmentGroups/py-x509-fleet", policy="dps", expect=200, body={
        "enrollmentGroupId": "py-x509-fleet",
        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": first_certificate(tmp_path / "root" / "cert.pem")}}}},
    })
    result = register_x509(hubsim, "py-x509-grp-1", tmp_path / "dev")
    assert result.status == "assigned"
    assert result.registration_state.device_id == "py-x509-grp-1"
    # A certificate from another CA with a plausible name gets nowhere.
    hubsim_certs(hubsim, tmp_path, "device", "--out", str(tmp_path / "rogue"), "--cn", "py-x509-grp-2")
    with pytest.raises(CredentialError) as refused:
        register_x509(hubsim, "py-x509-grp-2", tmp_path / "rogue")
    assert "not authorised" in str(refused.value.__cause__), repr(refused.value.__cause__)


def test_azure_quickstart_flow_unchanged(hubsim):
    # A hub named by its own address: the quickstart connects to the assigned hub by its name.
    key = enroll(hubsim, "symm-key-python-device-008", hub=QUICKSTART_HUB)
    env = dict(os.environ)
    env.update({
        "PROVISIONING_HOST": "localhost",
        "PROVISIONING_IDSCOPE": hubsim["id_scope"],
        "PROVISIONING_REGISTRATION_ID": "symm-key-python-device-008",
        "PROVISIONING_SYMMETRIC_KEY": key,
        # The only hubsim-specific step: trust its CA.
        "SSL_CERT_FILE": hubsim["ca_path"],
    })
    run = subprocess.run([sys.executable, str(HERE / "quickstart_device.py")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "sending message # 10" in run.stdout
    records = hubsim["api"].request("GET", "/sim/telemetry/symm-key-python-device-008", expect=200)
    assert [r["body"] for r in records] == [f"test wind speed {i}" for i in range(1, 11)]
    history = hubsim["api"].request("GET", "/sim/registrations", expect=200)
    assert any(h["registrationId"] == "symm-key-python-device-008" and h["outcome"] == "assigned" for h in history)
