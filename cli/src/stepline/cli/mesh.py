"""The embedded mesh on one machine: start, stop and inspect every component.

``stepline up`` starts PostgreSQL, nats-server (JetStream), the adb server,
simulated phones (``python -m stepline.phone``, which the device broker
connects through the adb server) and the five Stepline services, each as its
own process on loopback, waits until each is healthy, and records them in
``state.json`` in the state directory. Data (PostgreSQL, the JetStream store)
lives in the same directory, so ``down`` then ``up`` keeps every run; phones
and the approvals webhook keep their ports across restarts where they can
(``ports.json``), so device serials stay the same. ``stepline down`` stops
every process that ``up`` started.

Files written once, readable by the owner only: ``credentials.json`` (bearer
tokens of the principals below), ``service.token``, and
``approvals-secrets.json`` (the approvals service's webhook signing secrets).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepline.common import embedded
from stepline.common.auth import Authenticator, Principal, new_token
from stepline.common.client import check_health
from stepline.common.embedded import ProcessRecord
from stepline.common.errors import ConfigError, SteplineError, Unavailable

DATABASE = "stepline"
SERVICES = ("ledger", "scheduler", "approvals", "device-broker", "executor")
STATE_FILE = "state.json"
CREDENTIALS_FILE = "credentials.json"
SECRETS_FILE = "approvals-secrets.json"
PORTS_FILE = "ports.json"
PHONE_PREFIX = "phone-"
#: the principals ``up`` creates a bearer token for, with their roles; the CLI
#: picks one with ``--as NAME`` (the admin by default)
PRINCIPALS: Mapping[str, frozenset[str]] = {
    "admin": frozenset({"admin"}),
    "operator": frozenset({"operator"}),
    "approver": frozenset({"approver"}),
}
SERVICE_PRINCIPAL = Principal("stepline-services", frozenset({"service"}))
#: names of the approvals service's webhook signing secrets: ``inbound`` signs
#: decisions posted to its webhook, ``demo`` is there for subscriptions
WEBHOOK_SECRETS = ("inbound", "demo")
WEBHOOK_PATH = "/v1/decisions"


@dataclass
class MeshState:
    """What ``up`` started, as written to ``state.json``, and the credentials."""

    state_dir: Path
    components: list[ProcessRecord] = field(default_factory=list)
    admin_token: str = ""
    #: bearer token of each principal in :data:`PRINCIPALS` (admin included)
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.state_dir / STATE_FILE

    def record(self, name: str) -> ProcessRecord:
        for record in self.components:
            if record.name == name:
                return record
        raise Unavailable(f"the mesh has no component {name!r}")

    def endpoint(self, name: str) -> str:
        return self.record(name).endpoint

    @property
    def phones(self) -> list[str]:
        """The phones' addresses (``127.0.0.1:PORT``, also their adb serials)."""
        return [c.endpoint for c in self.components if is_phone(c.name)]

    @property
    def approvals_webhook(self) -> str:
        """The URL of the approvals service's inbound decision webhook."""
        return str(self.record("approvals").extra.get("webhook_url", ""))

    @property
    def secrets_file(self) -> Path:
        return self.state_dir / SECRETS_FILE

    def save(self) -> None:
        document = {"components": [c.to_json() for c in self.components]}
        self.path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, state_dir: Path) -> MeshState | None:
        path = state_dir / STATE_FILE
        if not path.exists():
            return None
        document = json.loads(path.read_text(encoding="utf-8"))
        state = cls(state_dir, [ProcessRecord.from_json(c) for c in document["components"]])
        credentials = state_dir / CREDENTIALS_FILE
        if credentials.exists():
            state.tokens = read_tokens(credentials)
            state.admin_token = state.tokens.get("admin", "")
        return state


@dataclass(frozen=True)
class Health:
    name: str
    healthy: bool
    alive: bool
    pid: int
    endpoint: str
    log: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def is_phone(name: str) -> bool:
    return name.startswith(PHONE_PREFIX)


def _write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text, encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return document


def read_tokens(path: Path) -> dict[str, str]:
    """Each principal's token from a credentials file: ``tokens`` by name, and the
    ``admin_token`` field that files written before ``tokens`` existed hold."""
    document = _read_json(path)
    tokens = document.get("tokens", {})
    if not isinstance(tokens, dict):
        raise ConfigError(f"{path}: 'tokens' must be an object of principal names to tokens")
    found = {str(name): str(token) for name, token in tokens.items() if token}
    if document.get("admin_token"):
        found.setdefault("admin", str(document["admin_token"]))
    return found


def _credentials(state_dir: Path) -> tuple[dict[str, str], Path, Path]:
    """Create (once) a token for each of :data:`PRINCIPALS` and the services;
    returns the tokens by principal, the auth file the services read, and the
    service token's file. A credentials file from before a principal existed
    gets that principal added; tokens already issued are kept."""
    path = state_dir / CREDENTIALS_FILE
    document = _read_json(path) if path.exists() else {}
    tokens = read_tokens(path) if path.exists() else {}
    service_token = str(document.get("service_token") or new_token())
    if set(PRINCIPALS) - set(tokens) or not document.get("service_token"):
        for name in PRINCIPALS:
            tokens.setdefault(name, new_token())
        document = {
            "admin_token": tokens["admin"],  # read by clients older than ``tokens``
            "service_token": service_token,
            "tokens": {name: tokens[name] for name in PRINCIPALS},
        }
        _write_private(path, json.dumps(document, indent=2) + "\n")
    auth_file = state_dir / "auth.json"
    Authenticator.write_file(
        auth_file,
        [
            *((tokens[name], Principal(name, roles)) for name, roles in PRINCIPALS.items()),
            (service_token, SERVICE_PRINCIPAL),
        ],
    )
    token_file = state_dir / "service.token"
    _write_private(token_file, service_token)
    return {name: tokens[name] for name in PRINCIPALS}, auth_file, token_file


def _webhook_secrets(state_dir: Path) -> Path:
    """The approvals service's signing secrets, created once (private file)."""
    path = state_dir / SECRETS_FILE
    secrets = _read_json(path).get("secrets", {}) if path.exists() else {}
    if not isinstance(secrets, dict):
        raise ConfigError(f"{path}: 'secrets' must be an object of names to secrets")
    if any(name not in secrets for name in WEBHOOK_SECRETS):
        for name in WEBHOOK_SECRETS:
            secrets.setdefault(name, new_token())
        _write_private(path, json.dumps({"secrets": secrets}, indent=2) + "\n")
    return path


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stable_ports(
    state_dir: Path, names: list[str], *, avoid: Collection[int] = ()
) -> dict[str, int]:
    """A port for each name: the one it had last time if still free, else a new
    one; never one of ``avoid`` (ports chosen but not bound yet)."""
    path = state_dir / PORTS_FILE
    known = _read_json(path) if path.exists() else {}
    ports: dict[str, int] = {}
    for name in names:
        taken = {*avoid, *ports.values()}
        port = known.get(name)
        if not (isinstance(port, int) and port not in taken and _port_is_free(port)):
            port = embedded.free_port()
            while port in taken:
                port = embedded.free_port()
        ports[name] = port
    path.write_text(json.dumps({**known, **ports}, indent=2) + "\n", encoding="utf-8")
    return ports


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _service_env(
    name: str,
    *,
    port: int,
    ports: dict[str, int],
    database_url: str,
    nats_url: str,
    adb_port: int,
    auth_file: Path,
    token_file: Path,
    extra: Mapping[str, str],
) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("STEPLINE_")}
    env.update(
        STEPLINE_LISTEN=f"127.0.0.1:{port}",
        STEPLINE_AUTH_FILE=str(auth_file),
        STEPLINE_SERVICE_TOKEN_FILE=str(token_file),
        STEPLINE_DATABASE_URL=database_url,
        STEPLINE_NATS_URL=nats_url,
        STEPLINE_ADB_SERVERS=f"127.0.0.1:{adb_port}",
        STEPLINE_LEDGER_ADDR=f"127.0.0.1:{ports['ledger']}",
        STEPLINE_APPROVALS_ADDR=f"127.0.0.1:{ports['approvals']}",
        STEPLINE_DEVICE_BROKER_ADDR=f"127.0.0.1:{ports['device-broker']}",
        STEPLINE_SCHEDULER_ADDR=f"127.0.0.1:{ports['scheduler']}",
        STEPLINE_EXECUTOR_ID=name if name[-1].isdigit() else f"{name}-1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def _is_service(name: str) -> bool:
    return name in SERVICES or name.startswith("executor-")


def up(
    state_dir: Path,
    *,
    executors: int = 1,
    phones: int = 0,
    env: Mapping[str, str] | None = None,
    progress: Callable[[str], None] = print,
) -> MeshState:
    """Start the whole mesh (or report the one already running), with ``executors``
    executor processes (named executor, executor-2, ...) and ``phones`` simulated
    phones (phone-1, phone-2, ...) that the device broker connects. ``env``:
    extra ``STEPLINE_*`` settings given to every service, over the mesh's own
    (tests use it for short leases and reconcile intervals)."""
    if executors < 1:
        raise ValueError("executors must be at least 1")
    if phones < 0:
        raise ValueError("phones must not be negative")
    extra = dict(env or {})
    foreign = sorted(key for key in extra if not key.startswith("STEPLINE_"))
    if foreign:
        raise ValueError(f"env may only hold STEPLINE_* settings, not {', '.join(foreign)}")
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    existing = MeshState.load(state_dir)
    if existing is not None:
        if all(embedded.is_alive(c) for c in existing.components):
            progress(f"the mesh is already running (state in {state_dir})")
            return existing
        progress("a previous mesh is partly down; stopping what is left of it")
        down(state_dir, progress=lambda _msg: None)

    logs = state_dir / "logs"
    state = MeshState(state_dir)
    try:
        _start_infrastructure(state, logs, progress)
        _start_phones(state, logs, progress, count=phones)
        _start_services(state, logs, progress, executors=executors, extra=extra)
    except BaseException:
        progress("start-up failed; stopping what was started")
        for record in reversed(state.components):
            embedded.stop(record, timeout_s=5)
        state.path.unlink(missing_ok=True)
        raise
    return state


def _start_infrastructure(state: MeshState, logs: Path, progress: Callable[[str], None]) -> None:
    root = state.state_dir
    pg_port = embedded.free_port()
    progress("starting PostgreSQL ...")
    postgres = embedded.start_postgres(
        root / "postgres", port=pg_port, log_path=logs / "postgres.log"
    )
    state.components.append(postgres)
    state.save()
    embedded.create_database(pg_port, DATABASE)
    progress("starting nats-server (JetStream) ...")
    state.components.append(
        embedded.start_nats(
            root / "nats",
            port=embedded.free_port(),
            monitor_port=embedded.free_port(),
            log_path=logs / "nats.log",
        )
    )
    state.save()
    progress("starting the adb server ...")
    state.components.append(
        embedded.start_adb(root / "adb", port=embedded.free_port(), log_path=logs / "adb.log")
    )
    state.save()


def _start_phones(
    state: MeshState, logs: Path, progress: Callable[[str], None], *, count: int
) -> None:
    """``count`` simulated phones, each a ``python -m stepline.phone`` process."""
    if count == 0:
        return
    names = [f"{PHONE_PREFIX}{i}" for i in range(1, count + 1)]
    ports = _stable_ports(state.state_dir, names)
    progress(f"starting {count} simulated phone{'s' if count > 1 else ''} ...")
    records = []
    for name in names:
        port = ports[name]
        argv = [sys.executable, "-m", "stepline.phone", "--port", str(port), "--serial-name", name]
        record = embedded.spawn(
            name,
            argv,
            log_path=logs / f"{name}.log",
            endpoint=f"127.0.0.1:{port}",
            port=port,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        state.components.append(record)
        records.append(record)
    state.save()
    for record in records:
        embedded.wait_until(
            lambda r=record: _tcp_open(r.port),  # type: ignore[misc]
            what=f"phone {record.name}",
            timeout_s=30,
            record=record,
        )


def _start_services(
    state: MeshState,
    logs: Path,
    progress: Callable[[str], None],
    *,
    executors: int,
    extra: Mapping[str, str],
) -> None:
    tokens, auth_file, token_file = _credentials(state.state_dir)
    state.tokens = tokens
    state.admin_token = tokens["admin"]
    postgres, nats, adb = (state.record(name) for name in ("postgres", "nats", "adb"))
    database_url = embedded.record_dsn(postgres, DATABASE)
    names = [*SERVICES, *(f"executor-{i}" for i in range(2, executors + 1))]
    ports = {name: embedded.free_port() for name in names}
    webhook_port = _stable_ports(state.state_dir, ["approvals-webhook"], avoid=ports.values())[
        "approvals-webhook"
    ]
    mesh_settings = {
        "STEPLINE_APPROVALS_WEBHOOK_LISTEN": f"127.0.0.1:{webhook_port}",
        "STEPLINE_APPROVALS_SECRETS_FILE": str(_webhook_secrets(state.state_dir)),
    }
    if state.phones:
        mesh_settings["STEPLINE_DEVICE_ADDRESSES"] = ",".join(state.phones)
    progress(f"starting {', '.join(names)} ...")
    started = []
    for name in names:
        service_env = _service_env(
            name,
            port=ports[name],
            ports=ports,
            database_url=database_url,
            nats_url=nats.endpoint,
            adb_port=adb.port,
            auth_file=auth_file,
            token_file=token_file,
            extra={**mesh_settings, **extra},
        )
        package = "executor" if name.startswith("executor") else name
        module = "stepline." + package.replace("-", "_")
        webhook = {"webhook_url": f"http://127.0.0.1:{webhook_port}{WEBHOOK_PATH}"}
        record = embedded.spawn(
            name,
            [sys.executable, "-m", module],
            log_path=logs / f"{name}.log",
            endpoint=f"127.0.0.1:{ports[name]}",
            port=ports[name],
            env=service_env,
            extra=webhook if name == "approvals" else None,
        )
        state.components.append(record)
        started.append(record)
    state.save()
    for record in started:
        embedded.wait_until(
            lambda r=record: asyncio.run(check_health(r.endpoint, timeout_s=1.0)),  # type: ignore[misc]
            what=f"service {record.name}",
            timeout_s=60,
            record=record,
        )


def down(state_dir: Path, *, progress: Callable[[str], None] = print) -> list[str]:
    """Stop every component ``up`` started, services first; returns their names."""
    state = MeshState.load(state_dir.resolve())
    if state is None:
        progress(f"nothing to stop: no mesh state in {state_dir}")
        return []
    services = [c for c in state.components if _is_service(c.name)]
    infrastructure = [c for c in state.components if not _is_service(c.name)]
    with ThreadPoolExecutor(max_workers=max(1, len(services))) as pool:
        graceful = list(pool.map(lambda r: embedded.stop(r, timeout_s=15), services))
    graceful += [embedded.stop(r, timeout_s=30) for r in reversed(infrastructure)]
    ordered = services + list(reversed(infrastructure))
    for record, ok in zip(ordered, graceful, strict=True):
        if not ok:
            progress(f"{record.name} did not stop in time and was killed (log: {record.log})")
    stopped = [c.name for c in state.components]
    progress(f"stopped {', '.join(stopped)}")
    state.path.unlink(missing_ok=True)
    return stopped


def _healthy(record: ProcessRecord) -> bool:
    if not embedded.is_alive(record):
        return False
    try:
        if record.name == "postgres":
            return embedded.postgres_ready(record.port)
        if record.name == "nats":
            return embedded.nats_healthy(int(record.extra["monitor_port"]))
        if record.name == "adb":
            return embedded.adb_healthy(record.port)
        if is_phone(record.name):
            return _tcp_open(record.port)
        return asyncio.run(check_health(record.endpoint, timeout_s=2.0))
    except SteplineError:
        return False


def status(state_dir: Path) -> list[Health]:
    """The health of each component of the mesh recorded in ``state_dir``."""
    state = MeshState.load(state_dir.resolve())
    if state is None:
        return []
    return [
        Health(
            name=c.name,
            healthy=_healthy(c),
            alive=embedded.is_alive(c),
            pid=c.pid,
            endpoint=c.endpoint,
            log=c.log,
            extra=dict(c.extra),
        )
        for c in state.components
    ]
