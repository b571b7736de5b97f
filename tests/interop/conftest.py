"""Fixtures: one `hubsim serve` on 127.0.0.1:8883, with HTTPS (its API, and MQTT over WebSockets)
on 443 (the Python SDK cannot change either port), and a small client for hubsim's management
API, authenticated like Azure's service APIs."""

import base64
import hashlib
import hmac
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
# DPS is `localhost` (127.0.0.1:8883); each hub is another host, as on Azure.
HUB = "sim-hub.example.net"  # what DPS assigns; devices reach it at HUB_ADDRESS via gateway_hostname
HUB_ADDRESS = "127.0.0.2"
QUICKSTART_HUB = "127.0.0.3"  # a hub named by its address: dialled by name, as the quickstart does


def sas_token(key_b64, resource, key_name=None, ttl=3600):
    """A SharedAccessSignature exactly as the Azure SDKs build it."""
    expiry = int(time.time() + ttl)
    sr = urllib.parse.quote(resource, safe="")
    signature = base64.b64encode(
        hmac.new(base64.b64decode(key_b64), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    ).decode()
    token = f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(signature, safe='')}&se={expiry}"
    if key_name:
        token += f"&skn={key_name}"
    return token


def derive_device_key(group_key_b64, registration_id):
    digest = hmac.new(base64.b64decode(group_key_b64), registration_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def wait_for_port(host, port, deadline):
    while time.time() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port}")


class Management:
    """hubsim's HTTPS management API (docs/hubsim.md)."""

    def __init__(self, base_url, ca_path, hub_cs, dps_cs):
        self.base = base_url
        self.ca_path = ca_path
        self.hub = self._policy(hub_cs)
        self.dps = self._policy(dps_cs)

    @staticmethod
    def _policy(connection_string):
        fields = dict(p.split("=", 1) for p in connection_string.strip().split(";"))
        return fields["HostName"], fields["SharedAccessKeyName"], fields["SharedAccessKey"]

    def _headers(self, policy):
        host, name, key = policy
        return {"Authorization": sas_token(key, host, name)}

    def request(self, method, path, policy="hub", body=None, expect=None):
        response = requests.request(
            method,
            self.base + path,
            headers=self._headers(self.hub if policy == "hub" else self.dps),
            json=body,
            verify=self.ca_path,
            timeout=60,
        )
        if expect is not None:
            assert response.status_code == expect, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else None


@pytest.fixture(scope="session")
def hubsim():
    binary = Path(os.environ.get("HUBSIM_BIN", REPO / "target" / "debug" / "hubsim"))
    assert binary.exists(), f"{binary} is missing: run `cargo build -p hubsim` first"
    state = Path(tempfile.mkdtemp(prefix="hubsim-interop-"))
    log = open(state / "hubsim.log", "w")
    process = subprocess.Popen(
        [str(binary), "serve", "--state-dir", str(state), "--mqtt-port", "8883", "--https-port", "443",
         "--hub", f"{HUB}={HUB_ADDRESS}", "--hub", QUICKSTART_HUB, "--retry-after", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 30
        endpoints_file = state / "endpoints.json"
        while not endpoints_file.exists():
            assert process.poll() is None, (state / "hubsim.log").read_text()
            assert time.time() < deadline, "hubsim did not write endpoints.json"
            time.sleep(0.05)
        endpoints = json.loads(endpoints_file.read_text())
        wait_for_port("127.0.0.1", 8883, deadline)
        wait_for_port(HUB_ADDRESS, 8883, deadline)
        https_port = int(endpoints["https"].rsplit(":", 1)[1])
        wait_for_port("127.0.0.1", https_port, deadline)
        hub_cs, dps_cs = (state / "connection-strings.txt").read_text().split()
        ca_path = str(state / "ca.pem")
        yield {
            "binary": binary,
            "https_port": https_port,
            "hub_connection_string": hub_cs,
            "ca_path": ca_path,
            "ca_pem": Path(ca_path).read_text(),
            "id_scope": endpoints["idScope"],
            "api": Management(f"https://localhost:{https_port}", ca_path, hub_cs, dps_cs),
            "state": state,
        }
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
