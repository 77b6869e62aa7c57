"""``stepline devices ...``: the device broker's inventory (list, show) and an
operator's actions on one device (quarantine, release, bind, unbind)."""

from __future__ import annotations

import argparse
import uuid
from datetime import UTC, datetime

from google.protobuf.message import Message

from stepline.api.common.v1 import common_pb2
from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.cli import output
from stepline.cli.connect import Clients
from stepline.cli.inputs import parse_inputs

PAGE_SIZE = 100


def parse_state(text: str) -> common_pb2.DeviceState.ValueType:
    """``quarantined``, ``QUARANTINED`` or ``DEVICE_STATE_QUARANTINED`` (an argparse type)."""
    name = text.strip().upper().removeprefix("DEVICE_STATE_")
    try:
        value = common_pb2.DeviceState.Value("DEVICE_STATE_" + name)
    except ValueError:
        value = common_pb2.DEVICE_STATE_UNSPECIFIED
    if value == common_pb2.DEVICE_STATE_UNSPECIFIED:
        known = ", ".join(
            n.removeprefix("DEVICE_STATE_").lower() for n in common_pb2.DeviceState.keys()[1:]
        )
        raise argparse.ArgumentTypeError(f"unknown device state {text!r} (one of: {known})")
    return value


def _now() -> datetime:
    return datetime.now(UTC)


def _request_id() -> str:
    return str(uuid.uuid4())


async def list_devices(args: argparse.Namespace, clients: Clients) -> int:
    """Every device matching the filters, by serial (all pages)."""
    request = pb.ListDevicesRequest(
        pool=args.pool or "",
        states=args.state,
        model=args.model or "",
        account=args.account or "",
        page_size=PAGE_SIZE,
    )
    collected = pb.ListDevicesResponse()
    while True:
        page = await clients.devices.ListDevices(request)
        collected.devices.extend(page.devices)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    if args.json:
        print(output.to_json(collected))
    elif not collected.devices:
        print("no devices")
    else:
        print(output.device_rows(collected.devices))
    return 0


async def show(args: argparse.Namespace, clients: Clients) -> int:
    """One device: its lease, its last health checks and any quarantine evidence."""
    response = await clients.devices.GetDevice(pb.GetDeviceRequest(serial=args.serial))
    if args.json:
        print(output.to_json(response))
    else:
        print(output.device_detail(response.device, now=_now()))
    return 0


async def quarantine(args: argparse.Namespace, clients: Clients) -> int:
    """Take a device out of service (a live lease is revoked)."""
    response = await clients.devices.QuarantineDevice(
        pb.QuarantineDeviceRequest(
            request_id=_request_id(),
            serial=args.serial,
            reason=args.reason,
            evidence=parse_inputs(args.evidence, flag="--evidence"),
        )
    )
    return _print_device(args, response, response.device)


async def release(args: argparse.Namespace, clients: Clients) -> int:
    """Return a quarantined device to service (after cleanup and health checks)."""
    response = await clients.devices.ReleaseDevice(
        pb.ReleaseDeviceRequest(request_id=_request_id(), serial=args.serial, reason=args.reason)
    )
    return _print_device(args, response, response.device)


async def bind(args: argparse.Namespace, clients: Clients) -> int:
    """Bind a device to an account: leases for that account get this device."""
    response = await clients.devices.BindAccount(
        pb.BindAccountRequest(request_id=_request_id(), serial=args.serial, account=args.account)
    )
    return _print_device(args, response, response.device)


async def unbind(args: argparse.Namespace, clients: Clients) -> int:
    """Remove a device's account binding (checked against ACCOUNT when given)."""
    response = await clients.devices.UnbindAccount(
        pb.UnbindAccountRequest(
            request_id=_request_id(), serial=args.serial, account=args.account or ""
        )
    )
    return _print_device(args, response, response.device)


def _print_device(args: argparse.Namespace, response: Message, device: pb.Device) -> int:
    """The response as JSON, or ``device SERIAL STATE[, bound to account A]``."""
    if args.json:
        print(output.to_json(response))
        return 0
    text = f"device {device.serial} {output.device_state(device.state)}"
    if device.bound_account:
        text += f", bound to account {device.bound_account}"
    print(text)
    return 0
