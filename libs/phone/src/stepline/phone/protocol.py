"""adb transport messages: the 24-byte header and its payload, as adbd frames them.

Every message is ``command, arg0, arg1, data_length, data_check, magic`` (six
little-endian uint32) followed by ``data_length`` bytes of payload. ``magic`` is
``command ^ 0xffffffff``; ``data_check`` is the byte sum of the payload, which
peers speaking version 0x01000001 or later no longer verify (so it is written
but never checked here). See AOSP packages/modules/adb/protocol.txt.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<6I")

A_SYNC = 0x434E5953
A_CNXN = 0x4E584E43
A_OPEN = 0x4E45504F
A_OKAY = 0x59414B4F
A_CLSE = 0x45534C43
A_WRTE = 0x45545257
A_AUTH = 0x48545541
A_STLS = 0x534C5453

A_VERSION = 0x01000001  # "skip checksum" version: payload checksums are not verified
MAX_PAYLOAD = 1024 * 1024
MAX_PAYLOAD_V1 = 4096

_NAMES = {
    A_SYNC: "SYNC",
    A_CNXN: "CNXN",
    A_OPEN: "OPEN",
    A_OKAY: "OKAY",
    A_CLSE: "CLSE",
    A_WRTE: "WRTE",
    A_AUTH: "AUTH",
    A_STLS: "STLS",
}


class ProtocolError(Exception):
    """The peer sent something that is not an adb message."""


@dataclass(frozen=True)
class Message:
    command: int
    arg0: int
    arg1: int
    data: bytes = b""

    @property
    def name(self) -> str:
        return _NAMES.get(self.command, f"0x{self.command:08x}")

    def encode(self) -> bytes:
        check = sum(self.data) & 0xFFFFFFFF
        magic = self.command ^ 0xFFFFFFFF
        header = HEADER.pack(self.command, self.arg0, self.arg1, len(self.data), check, magic)
        return header + self.data

    def __repr__(self) -> str:
        return f"Message({self.name}, {self.arg0}, {self.arg1}, {self.data[:40]!r})"


async def read_message(reader: asyncio.StreamReader, *, max_data: int) -> Message:
    """Read one message; ProtocolError on a bad header, IncompleteReadError at EOF."""
    header = await reader.readexactly(HEADER.size)
    command, arg0, arg1, length, _check, magic = HEADER.unpack(header)
    if magic != command ^ 0xFFFFFFFF:
        raise ProtocolError(f"bad magic for command 0x{command:08x}")
    if command not in _NAMES:
        raise ProtocolError(f"unknown command 0x{command:08x}")
    if length > max_data:
        raise ProtocolError(f"payload of {length} bytes exceeds {max_data}")
    data = await reader.readexactly(length) if length else b""
    return Message(command, arg0, arg1, data)


def banner(*, product: str, model: str, device: str, features: tuple[str, ...]) -> bytes:
    """The CNXN payload adbd sends: connection state, properties and features."""
    props = f"ro.product.name={product};ro.product.model={model};ro.product.device={device};"
    return f"device::{props}features={','.join(features)}".encode()
