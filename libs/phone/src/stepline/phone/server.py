"""The phone's adbd: a TCP server speaking the adb transport protocol.

One ``Connection`` per TCP connection (the adb server keeps one per device).
After the CNXN handshake the host OPENs streams to services (``shell:``,
``shell,v2:``, ``exec:``, ``sync:``); each stream runs as a task. Flow control
is adb's: a WRTE is acknowledged by an OKAY before the sender writes again.

``PhoneServer`` runs the asyncio server on a thread of its own, so blocking
callers (adbutils, tests, the broker's threads) can use it from anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType

from stepline.phone import sync
from stepline.phone.commands import COMMANDS
from stepline.phone.model import FAULTS, PhoneModel
from stepline.phone.protocol import (
    A_CLSE,
    A_CNXN,
    A_OKAY,
    A_OPEN,
    A_VERSION,
    A_WRTE,
    MAX_PAYLOAD,
    MAX_PAYLOAD_V1,
    Message,
    ProtocolError,
    banner,
    read_message,
)
from stepline.phone.shell import Result, Shell

log = logging.getLogger(__name__)

FEATURES = (
    "shell_v2",
    "stat_v2",
    "ls_v2",
    "fixed_push_mkdir",
    "fixed_push_symlink_timestamp",
    "sendrecv_v2",
    "sendrecv_v2_dry_run_send",
)
"""What this adbd implements, advertised in the CNXN banner."""

# shell protocol v2 packet ids
SHELL_STDIN, SHELL_STDOUT, SHELL_STDERR, SHELL_EXIT, SHELL_CLOSE_STDIN = 0, 1, 2, 3, 4


class StreamClosed(Exception):
    """The stream was closed (by either side) while a service used it."""


class Stream:
    """One adb stream: a byte pipe between a host socket and a phone service."""

    def __init__(self, conn: Connection, local_id: int, remote_id: int, destination: str) -> None:
        self.conn = conn
        self.local_id = local_id
        self.remote_id = remote_id
        self.destination = destination
        self.closed = False
        self._buffer = bytearray()
        self._readable = asyncio.Event()
        self._acked = asyncio.Event()
        self._acked.set()
        self._closed_event = asyncio.Event()

    # --- used by services ---

    async def read_exact(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self.closed:
                raise StreamClosed(self.destination)
            self._readable.clear()
            await self._readable.wait()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def read_some(self) -> bytes:
        """What has arrived (waiting for something); b"" once closed and drained."""
        while not self._buffer and not self.closed:
            self._readable.clear()
            await self._readable.wait()
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    async def write(self, data: bytes) -> None:
        step = self.conn.max_data
        for offset in range(0, len(data), step):
            while not self._acked.is_set():
                if self.closed:
                    raise StreamClosed(self.destination)
                await self._acked.wait()
            if self.closed:
                raise StreamClosed(self.destination)
            self._acked.clear()
            chunk = data[offset : offset + step]
            await self.conn.send(Message(A_WRTE, self.local_id, self.remote_id, chunk))

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    async def close(self) -> None:
        if self.closed:
            return
        self._mark_closed()
        with contextlib.suppress(ConnectionError):
            await self.conn.send(Message(A_CLSE, self.local_id, self.remote_id))

    # --- used by the connection ---

    def on_data(self, data: bytes) -> None:
        self._buffer.extend(data)
        self._readable.set()

    def on_ack(self) -> None:
        self._acked.set()

    def _mark_closed(self) -> None:
        self.closed = True
        self.conn.streams.pop(self.local_id, None)
        self._readable.set()
        self._acked.set()
        self._closed_event.set()

    def on_remote_close(self) -> None:
        self._mark_closed()


Service = Callable[[Stream], Awaitable[None]]


class Connection:
    """One host connection: handshake, then messages dispatched to streams."""

    def __init__(
        self, phone: PhoneServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.phone = phone
        self.reader = reader
        self.writer = writer
        self.max_data = MAX_PAYLOAD_V1
        self.streams: dict[int, Stream] = {}
        self._next_id = 1
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, message: Message) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError("connection closed")
        async with self._write_lock:
            self.writer.write(message.encode())
            await self.writer.drain()

    def drop(self, *, abort: bool = False) -> None:
        """Close the connection; unless ``abort``, what is already written is still sent."""
        if abort:
            self.writer.transport.abort()
        else:
            self.writer.transport.close()

    async def run(self) -> None:
        try:
            while True:
                message = await read_message(self.reader, max_data=MAX_PAYLOAD)
                await self._dispatch(message)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except ProtocolError as exc:
            log.warning("phone %s: dropping connection: %s", self.phone.model.serial_name, exc)
        finally:
            for stream in list(self.streams.values()):
                stream.on_remote_close()
            for task in list(self._tasks):
                task.cancel()
            self.writer.close()

    async def _dispatch(self, message: Message) -> None:
        command = message.command
        if command == A_CNXN:
            self.max_data = max(MAX_PAYLOAD_V1, min(message.arg1, MAX_PAYLOAD))
            model = self.phone.model
            payload = banner(
                product=model.product, model=model.model, device=model.device, features=FEATURES
            )
            await self.send(Message(A_CNXN, A_VERSION, MAX_PAYLOAD, payload))
        elif command == A_OPEN:
            await self._open(message)
        elif command == A_WRTE:
            stream = self.streams.get(message.arg1)
            if stream is None:
                await self.send(Message(A_CLSE, 0, message.arg0))
                return
            stream.on_data(message.data)
            await self.send(Message(A_OKAY, stream.local_id, stream.remote_id))
        elif command == A_OKAY:
            stream = self.streams.get(message.arg1)
            if stream is not None:
                stream.on_ack()
        elif command == A_CLSE:
            stream = self.streams.get(message.arg1)
            if stream is not None:
                stream.on_remote_close()
        # A_AUTH / A_STLS / A_SYNC: this phone never asks for either; ignore.

    async def _open(self, message: Message) -> None:
        destination = message.data.rstrip(b"\0").decode("utf-8", errors="replace")
        service = self.phone.service_for(destination)
        if service is None:
            log.info("phone %s: unsupported service %r", self.phone.model.serial_name, destination)
            await self.send(Message(A_CLSE, 0, message.arg0))
            return
        local_id = self._next_id
        self._next_id += 1
        stream = Stream(self, local_id, message.arg0, destination)
        self.streams[local_id] = stream
        await self.send(Message(A_OKAY, local_id, message.arg0))
        task = asyncio.create_task(self._serve(stream, service))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: Stream, service: Service) -> None:
        try:
            await service(stream)
        except (StreamClosed, ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception(
                "phone %s: service %r failed", self.phone.model.serial_name, stream.destination
            )
        finally:
            await stream.close()
            self.phone.after_service()


class PhoneServer:
    """A simulated phone listening for adb connections on ``host:port`` (0 = any free)."""

    def __init__(
        self, model: PhoneModel | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.model = model if model is not None else PhoneModel()
        self.host = host
        self._port = port
        self._shell = Shell(self.model, COMMANDS)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._connections: set[Connection] = set()

    # --- lifecycle (any thread) ---

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to ``adb connect`` to (loopback when listening on every address)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"{host}:{self._port}"

    def start(self) -> PhoneServer:
        if self._thread is not None:
            raise RuntimeError("phone already started")
        self._ready.clear()  # a stopped phone may start again (on the same port)
        self._error = None
        self._thread = threading.Thread(
            target=self._run, name=f"phone-{self.model.serial_name}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self

    def stop(self) -> None:
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> PhoneServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def set_fault(self, name: str) -> None:
        """Inject a fault (see ``FAULTS``); ``drop`` closes every connection at once."""
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}")
        with self.model.lock:
            self.model.faults.add(name)
        self._call(self.after_service)

    def clear_fault(self, name: str = "all") -> None:
        with self.model.lock:
            if name == "all":
                self.model.faults.clear()
            else:
                self.model.faults.discard(name)

    def shell(self, script: str) -> Result:
        """Run a shell script on the phone directly (no adb), e.g. for setup in tests."""
        with self.model.lock:
            return self._shell.run(script)

    def _call(self, function: Callable[[], None]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(function)

    # --- the protocol thread ---

    def _run(self) -> None:
        try:
            with asyncio.Runner() as runner:  # cancels leftover tasks when it closes
                self._loop = runner.get_loop()
                runner.run(self._main())
        except BaseException as exc:  # reported to start(), or logged when already running
            if not self._ready.is_set():
                self._error = exc
            else:
                log.exception("phone %s stopped with an error", self.model.serial_name)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._on_client, self.host, self._port)
        self._port = server.sockets[0].getsockname()[1]
        self._ready.set()
        log.info("phone %s listening on %s", self.model.serial_name, self.address)
        try:
            await self._stopping.wait()
        finally:
            server.close()
            self._drop_connections(abort=True)
            await server.wait_closed()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if "drop" in self.model.faults:
            writer.transport.abort()
            return
        conn = Connection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    def _drop_connections(self, *, abort: bool = False) -> None:
        for conn in list(self._connections):
            conn.drop(abort=abort)

    def after_service(self) -> None:
        """Apply a fault that a command just set (``drop``: cut every connection)."""
        if "drop" in self.model.faults:
            self._drop_connections()

    # --- services ---

    def service_for(self, destination: str) -> Service | None:
        name, _, rest = destination.partition(":")
        if name == "shell" or name.startswith("shell,"):
            options = name.split(",")[1:]
            return lambda stream: self._shell_service(stream, rest, v2="v2" in options)
        if name == "exec":
            return lambda stream: self._shell_service(stream, rest, v2=False)
        if destination == "sync:":
            return self._sync_service
        return None

    def _hangs(self, script: str) -> bool:
        return "hang" in self.model.faults and script.split(maxsplit=1)[:1] != ["simctl"]

    async def _shell_service(self, stream: Stream, script: str, *, v2: bool) -> None:
        if not script.strip():
            await self._interactive(stream, v2=v2)
            return
        if self._hangs(script):
            await stream.wait_closed()
            return
        with self.model.lock:
            result = Shell(self.model, COMMANDS).run(script)
        await _write_result(stream, result, v2=v2)

    async def _interactive(self, stream: Stream, *, v2: bool) -> None:
        """``adb shell`` with no command: run each line received, until ``exit``/EOF."""
        shell = Shell(self.model, COMMANDS)
        pending = b""
        while True:
            data = await (_read_stdin_v2(stream) if v2 else stream.read_some())
            if not data:
                break
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                script = line.decode(errors="replace")
                if self._hangs(script):
                    await stream.wait_closed()
                    return
                with self.model.lock:
                    result = shell.run(script)
                await _write_output(stream, result, v2=v2)
                if script.strip().startswith("exit"):
                    await _write_exit(stream, result.status, v2=v2)
                    return
        await _write_exit(stream, shell.status, v2=v2)

    async def _sync_service(self, stream: Stream) -> None:
        if "hang" in self.model.faults:
            await stream.wait_closed()
            return
        await sync.serve(stream, self.model)


def _packet(kind: int, data: bytes) -> bytes:
    return struct.pack("<BI", kind, len(data)) + data


async def _write_output(stream: Stream, result: Result, *, v2: bool) -> None:
    data = b"".join(_packet(fd, chunk) for fd, chunk in result.chunks) if v2 else result.output
    if data:
        await stream.write(data)


async def _write_exit(stream: Stream, status: int, *, v2: bool) -> None:
    if v2:
        await stream.write(_packet(SHELL_EXIT, bytes([status & 0xFF])))


async def _write_result(stream: Stream, result: Result, *, v2: bool) -> None:
    await _write_output(stream, result, v2=v2)
    await _write_exit(stream, result.status, v2=v2)


async def _read_stdin_v2(stream: Stream) -> bytes:
    """The next stdin bytes of a shell v2 stream (b"" at close-stdin or close)."""
    while True:
        try:
            kind, length = struct.unpack("<BI", await stream.read_exact(5))
            data = await stream.read_exact(length)
        except StreamClosed:
            return b""
        if kind == SHELL_CLOSE_STDIN:
            return b""
        if kind == SHELL_STDIN and data:
            return data
