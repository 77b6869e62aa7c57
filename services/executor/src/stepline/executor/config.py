"""Executor settings, read once from ``STEPLINE_*`` variables."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from stepline.common.config import (
    ClientSettings,
    Env,
    NatsSettings,
    ServerSettings,
    service_address,
)


@dataclass(frozen=True, kw_only=True)
class ExecutorSettings:
    server: ServerSettings
    client: ClientSettings
    nats: NatsSettings
    ledger_addr: str
    executor_id: str
    device_broker_addr: str = ""
    approvals_addr: str = ""
    #: WorkflowService (the scheduler), to resolve the child workflows of
    #: WorkflowRef steps; empty: such steps fail unless a resolver is given
    scheduler_addr: str = ""
    max_concurrent_runs: int = 16
    #: claim lease asked of the ledger; renewed every half lease
    lease_s: float = 30.0
    #: how long a job may go without an ack or in-progress before redelivery
    ack_wait_s: float = 30.0
    #: chunks of one chunked step in flight when the step sets no max_concurrency
    chunk_concurrency: int = 16
    #: most records a generator may yield when the step sets no max_chunks
    max_chunks: int = 10_000
    #: hosts the http.* verbs may reach
    http_allowed_hosts: tuple[str, ...] = ()
    #: device lease duration asked of the broker; renewed every third of it
    device_ttl_s: float = 30.0
    #: how long a step waits for a matching device before DEVICE_UNAVAILABLE
    device_wait_s: float = 60.0
    #: socket timeout of one adb command of an android.* verb
    adb_timeout_s: float = 30.0

    @classmethod
    def from_env(cls, env: Env) -> ExecutorSettings:
        scheduler = env.optional("SCHEDULER_ADDR")
        hosts = env.text("HTTP_ALLOWED_HOSTS", "")
        return cls(
            server=ServerSettings.from_env(env, service="executor"),
            client=ClientSettings.from_env(env),
            nats=NatsSettings.from_env(env),
            ledger_addr=service_address(env, "LEDGER_ADDR"),
            device_broker_addr=service_address(env, "DEVICE_BROKER_ADDR"),
            approvals_addr=service_address(env, "APPROVALS_ADDR"),
            scheduler_addr=service_address(env, "SCHEDULER_ADDR") if scheduler else "",
            executor_id=env.text("EXECUTOR_ID", f"{socket.gethostname()}-{os.getpid()}"),
            max_concurrent_runs=env.integer("MAX_CONCURRENT_RUNS", 16, minimum=1),
            lease_s=env.number("EXECUTOR_LEASE_S", 30.0, minimum=1.0),
            ack_wait_s=env.number("EXECUTOR_ACK_WAIT_S", 30.0, minimum=1.0),
            chunk_concurrency=env.integer("CHUNK_CONCURRENCY", 16, minimum=1),
            max_chunks=env.integer("MAX_CHUNKS", 10_000, minimum=1),
            http_allowed_hosts=tuple(h.strip() for h in hosts.split(",") if h.strip()),
            device_ttl_s=env.number("EXECUTOR_DEVICE_TTL_S", 30.0, minimum=1.0),
            device_wait_s=env.number("EXECUTOR_DEVICE_WAIT_S", 60.0, minimum=0.1),
            adb_timeout_s=env.number("EXECUTOR_ADB_TIMEOUT_S", 30.0, minimum=0.1),
        )
