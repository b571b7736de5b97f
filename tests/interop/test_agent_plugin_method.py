"""Azure's Python service SDK (azure-iot-hub) invokes a plugin's direct method on the real
hubagent, through hubsim: the SDK's `invoke_device_method` reaches the agent, which routes
`<plugin>.<method>` to the Python exec example and passes its status and JSON back (#17); and the
agent's remote diagnostics, `logs` (filtered, bounded) and `check`, carry no secret (#20)."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from azure.iot.hub.models import CloudToDeviceMethod

from conftest import QUICKSTART_HUB, REPO
from test_python_sdk import TIMEOUT, enroll
from test_service_and_x509 import registry  # noqa: F401 (a fixture)

DEVICE = "agent-interop-1"


def agent_config(hubsim, tmp_path, key):
    key_file = tmp_path / "device.key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    # Plugins must be files no one else can write (as root: the trust check of docs/plugins.md).
    plugins = tmp_path / "plugins"
    plugins.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    script = plugins / "sensor.py"
    shutil.copy(REPO / "plugins/examples/python-exec/sensor.py", script)
    script.chmod(0o755)
    config = tmp_path / "config.toml"
    config.write_text(f"""[agent]
state_dir = "{tmp_path / 'state'}"
control_socket = "{tmp_path / 'control.sock'}"
allow_unsafe_plugin_paths = true

[provisioning]
source = "dps"
global_endpoint = "localhost"
id_scope = "{hubsim['id_scope']}"
registration_id = "{DEVICE}"

[provisioning.attestation]
method = "symmetric_key"
key = {{ file = "{key_file}" }}

[hub]
port = 8883
trust_bundle = "{hubsim['ca_path']}"

[[plugin]]
name = "room"
kind = "exec"
# Debian's interpreter, which the plugin sandbox lets a plugin execute (it is under /usr).
command = ["/usr/bin/python3", "{script}"]
[plugin.settings]
interval = "500ms"
room = "lab"
""")
    return config


def wait_for(what, check, log):
    deadline = time.time() + TIMEOUT
    while True:
        result = check()
        if result:
            return result
        assert time.time() < deadline, f"{what}: not reached\n{log.read_text()}"
        time.sleep(0.1)


def test_the_service_sdk_invokes_a_plugin_method(hubsim, registry, tmp_path):  # noqa: F811
    binary = Path(os.environ.get("HUBAGENT_BIN", REPO / "target" / "debug" / "hubagent"))
    assert binary.exists(), f"{binary} is missing: run `cargo build --workspace` first"
    # The hub named by its address: the agent dials the hub by the name DPS assigns.
    key = enroll(hubsim, DEVICE, hub=QUICKSTART_HUB)
    config = agent_config(hubsim, tmp_path, key)
    log = tmp_path / "agent.log"
    with open(log, "w") as out:
        agent = subprocess.Popen([str(binary), "-c", str(config), "run"], stdout=out, stderr=subprocess.STDOUT)
    try:
        def plugin_declared():
            listing = subprocess.run([str(binary), "-c", str(config), "plugins", "list", "--json"],
                                     capture_output=True, text=True)
            try:
                return json.loads(listing.stdout)["room"].get("methods")
            except (ValueError, KeyError):
                return None

        wait_for("the exec plugin declares its methods", plugin_declared, log)
        wait_for("the agent reports its plugins to the hub",
                 lambda: registry.get_twin(DEVICE).properties.reported.get("plugins", {}).get("room"), log)

        def invoke(method, payload):
            return registry.invoke_device_method(
                DEVICE, CloudToDeviceMethod(method_name=method, payload=payload, response_timeout_in_seconds=TIMEOUT))

        answer = invoke("room.set_room", "r7")
        assert (answer.status, answer.payload) == (200, {"room": "r7"})
        answer = invoke("room.read", None)
        assert answer.status == 200 and answer.payload["room"] == "r7", answer.payload
        # The agent's own answers reach the SDK as they are, too.
        answer = invoke("room.nope", {})
        assert answer.status == 404 and "declares: read, set_room" in answer.payload["error"], answer.payload
        answer = invoke("ping", None)
        assert answer.status == 200

        # Remote diagnostics: the plugin's own lines, at most three; nothing else, no secret.
        answer = invoke("logs", {"plugin": "room", "limit": 3})
        assert answer.status == 200, answer.payload
        lines = answer.payload["lines"]
        assert 0 < len(lines) <= 3, answer.payload
        assert all(line["plugin"] == "room" for line in lines), answer.payload
        answer = invoke("logs", {"level": "trace", "limit": 2000})
        assert answer.status == 200 and answer.payload["lines"], answer.payload
        assert len(json.dumps(answer.payload)) <= 100 * 1024, "the answer exceeds its 100 KiB bound"
        answer_text = json.dumps(answer.payload)
        answer = invoke("check", None)
        assert answer.status == 200, answer.payload
        ids = {check["id"] for check in answer.payload["checks"]}
        assert {"config.valid", "plugins.load"} <= ids, ids
        answer_text += json.dumps(answer.payload)
        assert key not in answer_text, "the device key reached a diagnostics answer"
        assert "SharedAccessSignature" not in answer_text, "a SAS token reached a diagnostics answer"
    finally:
        agent.terminate()
        assert agent.wait(timeout=30) == 0, log.read_text()
