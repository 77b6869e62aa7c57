"""The embedded mesh on one machine: start, stop and inspect every component.

``stepline up`` starts PostgreSQL, nats-server (JetStream), the adb server and
the five Stepline services, each as its own process on loopback and free ports,
waits until each is healthy, and records them in ``state.json`` in the state
directory. Data (PostgreSQL, the JetStream store) lives in the same directory,
so ``down`` then ``up`` keeps every run. ``stepline down`` stops every process
that ``up`` started.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepline.common import embedded
from stepline.common.auth import Authenticator, Principal, new_token
from stepline.common.client import check_health
from stepline.common.embedded import ProcessRecord
from stepline.common.errors import SteplineError, Unavailable

DATABASE = "stepline"
SERVICES = ("ledger", "scheduler", "approvals", "device-broker", "executor")
STATE_FILE = "state.json"
CREDENTIALS_FILE = "credentials.json"


@dataclass
class MeshState:
    """What ``up`` started, as written to ``state.json``."""

    state_dir: Path
    components: list[ProcessRecord] = field(default_factory=list)
    admin_token: str = ""

    @property
    def path(self) -> Path:
        return self.state_dir / STATE_FILE

    def endpoint(self, name: str) -> str:
        for record in self.components:
            if record.name == name:
                return record.endpoint
        raise Unavailable(f"the mesh has no component {name!r}")

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
            state.admin_token = json.loads(credentials.read_text(encoding="utf-8"))["admin_token"]
        return state


@dataclass(frozen=True)
class Health:
    name: str
    healthy: bool
    alive: bool
    pid: int
    endpoint: str
    log: str

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text, encoding="utf-8")


def _credentials(state_dir: Path) -> tuple[str, Path, Path]:
    """Create (once) the admin and service tokens; returns the admin token, the
    auth file the services read, and the service token's file."""
    credentials = state_dir / CREDENTIALS_FILE
    if credentials.exists():
        tokens = json.loads(credentials.read_text(encoding="utf-8"))
    else:
        tokens = {"admin_token": new_token(), "service_token": new_token()}
        _write_private(credentials, json.dumps(tokens, indent=2) + "\n")
    auth_file = state_dir / "auth.json"
    Authenticator.write_file(
        auth_file,
        [
            (tokens["admin_token"], Principal("admin", frozenset({"admin"}))),
            (tokens["service_token"], Principal("stepline-services", frozenset({"service"}))),
        ],
    )
    token_file = state_dir / "service.token"
    _write_private(token_file, tokens["service_token"])
    return str(tokens["admin_token"]), auth_file, token_file


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
    env: Mapping[str, str] | None = None,
    progress: Callable[[str], None] = print,
) -> MeshState:
    """Start the whole mesh (or report the one already running), with ``executors``
    executor processes (named executor, executor-2, ...). ``env``: extra
    ``STEPLINE_*`` settings given to every service, over the mesh's own (tests
    use it for short leases and reconcile intervals)."""
    if executors < 1:
        raise ValueError("executors must be at least 1")
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


def _start_services(
    state: MeshState,
    logs: Path,
    progress: Callable[[str], None],
    *,
    executors: int,
    extra: Mapping[str, str],
) -> None:
    admin_token, auth_file, token_file = _credentials(state.state_dir)
    state.admin_token = admin_token
    postgres, nats, adb = state.components[:3]
    database_url = embedded.postgres_dsn(postgres.port, DATABASE)
    names = [*SERVICES, *(f"executor-{i}" for i in range(2, executors + 1))]
    ports = {name: embedded.free_port() for name in names}
    progress(f"starting {', '.join(names)} ...")
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
            extra=extra,
        )
        package = "executor" if name.startswith("executor") else name
        module = "stepline." + package.replace("-", "_")
        state.components.append(
            embedded.spawn(
                name,
                [sys.executable, "-m", module],
                log_path=logs / f"{name}.log",
                endpoint=f"127.0.0.1:{ports[name]}",
                port=ports[name],
                env=service_env,
            )
        )
    state.save()
    for record in state.components[3:]:
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
        )
        for c in state.components
    ]
