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
    device_broker_addr: str
    approvals_addr: str
    executor_id: str
    max_concurrent_runs: int

    @classmethod
    def from_env(cls, env: Env) -> ExecutorSettings:
        return cls(
            server=ServerSettings.from_env(env, service="executor"),
            client=ClientSettings.from_env(env),
            nats=NatsSettings.from_env(env),
            ledger_addr=service_address(env, "LEDGER_ADDR"),
            device_broker_addr=service_address(env, "DEVICE_BROKER_ADDR"),
            approvals_addr=service_address(env, "APPROVALS_ADDR"),
            executor_id=env.text("EXECUTOR_ID", f"{socket.gethostname()}-{os.getpid()}"),
            max_concurrent_runs=env.integer("MAX_CONCURRENT_RUNS", 16, minimum=1),
        )
