"""The Python SDK peer of bench/run.py: Azure's official device SDK (azure-iot-device) against
hubsim on localhost:8883 (the only port it can dial).

  send CONNECTION_STRING CA COUNT SIZE INFLIGHT
      connects, sends COUNT messages of SIZE bytes (QoS 1, INFLIGHT awaiting PUBACK at a time),
      prints {"count", "seconds", "msgs_per_s"}
  provision REGISTRATION_ID SCOPE KEY CA
      registers with DPS, connects to the assigned hub and sends one message (Azure's
      quickstart flow); prints {"seconds"} measured from interpreter start (imports included,
      as the agent's figure includes its process start)
"""

import asyncio
import json
import sys
import time
import uuid

from azure.iot.device import Message  # noqa: E402
from azure.iot.device.aio import IoTHubDeviceClient, ProvisioningDeviceClient  # noqa: E402


def body(seq, size):
    head = '{"seq":%d,"pad":"' % seq
    return head + "x" * max(0, size - len(head) - 2) + '"}'


def message(seq, size):
    m = Message(body(seq, size))
    m.message_id = str(uuid.uuid4())
    m.content_type = "application/json"
    m.content_encoding = "utf-8"
    return m


async def send(connection_string, ca, count, size, inflight):
    with open(ca) as f:
        cert = f.read()
    client = IoTHubDeviceClient.create_from_connection_string(
        connection_string, server_verification_cert=cert
    )
    await client.connect()
    window = asyncio.Semaphore(inflight)

    async def one(seq):
        async with window:
            await client.send_message(message(seq, size))

    t0 = time.time()
    await asyncio.gather(*(one(seq) for seq in range(1, count + 1)))
    seconds = time.time() - t0
    await client.shutdown()
    print(json.dumps({"count": count, "seconds": seconds, "msgs_per_s": count / seconds}))


async def provision(registration_id, scope, key, ca):
    with open(ca) as f:
        cert = f.read()
    dps = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host="localhost",
        registration_id=registration_id,
        id_scope=scope,
        symmetric_key=key,
        server_verification_cert=cert,
    )
    result = await dps.register()
    if result.status != "assigned":
        raise SystemExit(f"DPS did not assign {registration_id}: {result.status}")
    state = result.registration_state
    client = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=key,
        hostname=state.assigned_hub,
        device_id=state.device_id,
        server_verification_cert=cert,
    )
    await client.connect()
    await client.send_message(message(1, 256))
    done_at = time.time()
    await client.shutdown()
    print(json.dumps({"done_at": done_at}))


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "send":
        cs, ca, count, size, inflight = rest
        asyncio.run(send(cs, ca, int(count), int(size), int(inflight)))
    elif mode == "provision":
        asyncio.run(provision(*rest))
    else:
        raise SystemExit(f"unknown mode {mode!r} (send, provision)")
