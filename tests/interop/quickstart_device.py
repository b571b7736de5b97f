"""What Azure's symmetric-key provisioning quickstart does, step for step: read the four
PROVISIONING_* variables, register with DPS, connect to the assigned hub and send 10 messages.
Nothing hubsim-specific: the only difference from talking to Azure is that the machine trusts
hubsim's CA (SSL_CERT_FILE), exactly how a newcomer runs Azure's own sample against hubsim."""

import asyncio
import os
import uuid

from azure.iot.device import Message
from azure.iot.device.aio import IoTHubDeviceClient, ProvisioningDeviceClient


async def main():
    provisioning = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=os.environ["PROVISIONING_HOST"],
        registration_id=os.environ["PROVISIONING_REGISTRATION_ID"],
        id_scope=os.environ["PROVISIONING_IDSCOPE"],
        symmetric_key=os.environ["PROVISIONING_SYMMETRIC_KEY"],
    )
    result = await provisioning.register()
    print("The complete registration result is", result.registration_state)
    if result.status != "assigned":
        raise SystemExit(f"not assigned: {result.status}")
    device = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=os.environ["PROVISIONING_SYMMETRIC_KEY"],
        hostname=result.registration_state.assigned_hub,
        device_id=result.registration_state.device_id,
    )
    await device.connect()
    for i in range(1, 11):
        message = Message(f"test wind speed {i}")
        message.message_id = uuid.uuid4()
        await device.send_message(message)
        print("sending message #", i)
    await device.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
