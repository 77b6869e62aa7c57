"""The ``sync:`` service: file transfer, as AOSP's SYNC.TXT and file_sync_protocol.h define it.

Requests are ``id (4 ASCII bytes) + length (uint32 LE) + path``. Implemented:
STAT/LIST/SEND/RECV (v1), STA2/LST2/LIS2 (stat_v2, ls_v2), SND2/RCV2
(sendrecv_v2, without compression) and QUIT.
"""

from __future__ import annotations

import errno
import posixpath
import stat
import struct
import time
from typing import Protocol

from stepline.phone.model import PhoneModel, normpath
from stepline.phone.shell import writable

SYNC_DATA_MAX = 64 * 1024
MAX_PATH = 1024

_REQUEST = struct.Struct("<4sI")
_STAT_V1 = struct.Struct("<4s3I")  # id, mode, size, mtime
_DENT_V1 = struct.Struct("<4s4I")  # id, mode, size, mtime, namelen
# id, error, dev, ino, mode, nlink, uid, gid, size, atime, mtime, ctime
_STAT_V2 = struct.Struct("<4sIQQIIIIQqqq")
_DENT_V2 = struct.Struct("<4sIQQIIIIQqqqI")  # ... + namelen
_SEND_V2 = struct.Struct("<4sII")  # id, mode, flags
_RECV_V2 = struct.Struct("<4sI")  # id, flags

DIR_MODE = stat.S_IFDIR | 0o771
FILE_MODE = stat.S_IFREG | 0o660
SHELL_UID = 2000


class SyncStream(Protocol):
    async def read_exact(self, n: int) -> bytes: ...

    async def write(self, data: bytes) -> None: ...


class _Fail(Exception):
    pass


def _stat(model: PhoneModel, path: str) -> tuple[int, int, int] | None:
    """(mode, size, mtime) or None when the path does not exist."""
    path = normpath(path)
    if path in model.files:
        return FILE_MODE, len(model.files[path]), model.file_times.get(path, 0)
    if model.is_dir(path):
        return DIR_MODE, 4096, 0
    return None


def _stat_v2(ident: bytes, found: tuple[int, int, int] | None, path: str) -> bytes:
    if found is None:
        return _STAT_V2.pack(ident, errno.ENOENT, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    mode, size, mtime = found
    ino = hash(normpath(path)) & 0xFFFFFFFF
    return _STAT_V2.pack(
        ident, 0, 0xFD00, ino, mode, 1, SHELL_UID, SHELL_UID, size, mtime, mtime, mtime
    )


async def serve(stream: SyncStream, model: PhoneModel) -> None:
    """Answer sync requests until QUIT (or the stream closes)."""
    while True:
        ident, length = _REQUEST.unpack(await stream.read_exact(8))
        if ident == b"QUIT":
            return
        if length > MAX_PATH:
            await _fail(stream, f"path too long ({length} bytes)")
            return
        path = (await stream.read_exact(length)).decode("utf-8", errors="replace")
        if ident == b"STAT":
            with model.lock:
                found = _stat(model, path) or (0, 0, 0)
            await stream.write(_STAT_V1.pack(b"STAT", *found))
        elif ident in (b"STA2", b"LST2"):
            with model.lock:
                found_v2 = _stat(model, path)
            await stream.write(_stat_v2(ident, found_v2, path))
        elif ident in (b"LIST", b"LIS2"):
            await _list(stream, model, path, v2=ident == b"LIS2")
        elif ident == b"SEND":
            target, _, _mode = path.rpartition(",")  # "path,mode": the mode is not kept
            await _receive_file(stream, model, target or path)
        elif ident == b"SND2":
            _id, _mode, flags = _SEND_V2.unpack(await stream.read_exact(_SEND_V2.size))
            if flags & 0x7FFFFFFF:
                await _fail(stream, "compressed transfers are not supported")
                return
            await _receive_file(stream, model, path, dry_run=bool(flags & 0x80000000))
        elif ident == b"RECV":
            await _send_file(stream, model, path)
        elif ident == b"RCV2":
            _id, flags = _RECV_V2.unpack(await stream.read_exact(_RECV_V2.size))
            if flags:
                await _fail(stream, "compressed transfers are not supported")
                return
            await _send_file(stream, model, path)
        else:
            await _fail(stream, f"unknown sync request {ident!r}")
            return


async def _fail(stream: SyncStream, message: str) -> None:
    data = message.encode()
    await stream.write(b"FAIL" + struct.pack("<I", len(data)) + data)


async def _list(stream: SyncStream, model: PhoneModel, path: str, *, v2: bool) -> None:
    entries: list[bytes] = []
    with model.lock:
        base = normpath(path)
        names = [".", "..", *model.list_dir(base)] if model.is_dir(base) else []
        for name in names:
            full = base if name in (".", "..") else posixpath.join(base, name)
            found = _stat(model, full) or (DIR_MODE, 4096, 0)
            raw = name.encode()
            if v2:
                head = _stat_v2(b"DNT2", found, full)
                entries.append(head + struct.pack("<I", len(raw)) + raw)
            else:
                entries.append(_DENT_V1.pack(b"DENT", *found, len(raw)) + raw)
    if v2:
        done = _DENT_V2.pack(b"DONE", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    else:
        done = _DENT_V1.pack(b"DONE", 0, 0, 0, 0)
    await stream.write(b"".join(entries) + done)


async def _receive_file(
    stream: SyncStream, model: PhoneModel, path: str, *, dry_run: bool = False
) -> None:
    """SEND/SND2: DATA chunks then DONE(mtime); answer OKAY or FAIL."""
    chunks: list[bytes] = []
    while True:
        ident, length = _REQUEST.unpack(await stream.read_exact(8))
        if ident == b"DATA":
            if length > SYNC_DATA_MAX:
                await _fail(stream, f"data chunk of {length} bytes exceeds {SYNC_DATA_MAX}")
                return
            chunks.append(await stream.read_exact(length))
        elif ident == b"DONE":
            mtime = length
            break
        else:
            await _fail(stream, f"unexpected {ident!r} during a transfer")
            return
    if dry_run:
        await stream.write(b"OKAY\0\0\0\0")
        return
    try:
        with model.lock:
            _store(model, path, b"".join(chunks), mtime or int(time.time()))
    except _Fail as exc:
        await _fail(stream, str(exc))
        return
    await stream.write(b"OKAY\0\0\0\0")


def _store(model: PhoneModel, path: str, data: bytes, mtime: int) -> None:
    target = normpath(path)
    if model.is_dir(target):
        raise _Fail(f"couldn't create file: {path}: Is a directory")
    if not writable(target):
        raise _Fail(f"couldn't create file: {path}: Permission denied")
    try:
        model.write_file(target, data, mtime=mtime)  # creates parents (fixed_push_mkdir)
    except OSError as exc:  # no space left, a parent that is a file
        raise _Fail(f"couldn't create file: {exc}") from exc


async def _send_file(stream: SyncStream, model: PhoneModel, path: str) -> None:
    """RECV/RCV2: DATA chunks, then DONE; FAIL when the file cannot be read."""
    with model.lock:
        target = normpath(path)
        data = model.files.get(target)
        is_dir = model.is_dir(target)
    if data is None:
        reason = "Is a directory" if is_dir else "No such file or directory"
        await _fail(stream, f"open failed: {reason}")
        return
    frames = [
        b"DATA" + struct.pack("<I", len(chunk)) + chunk
        for chunk in (data[i : i + SYNC_DATA_MAX] for i in range(0, len(data), SYNC_DATA_MAX))
    ]
    await stream.write(b"".join(frames) + b"DONE\0\0\0\0")  # sent in max-payload messages
