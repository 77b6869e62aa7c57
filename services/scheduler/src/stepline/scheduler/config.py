"""Scheduler settings, read once from ``STEPLINE_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass

from stepline.common.config import (
    ClientSettings,
    Env,
    NatsSettings,
    ServerSettings,
    database_url,
    service_address,
)


@dataclass(frozen=True, kw_only=True)
class SchedulerSettings:
    """What the scheduler needs; an interval of 0 turns its background loop off.

    ``tick_interval_s``: how often the cron ticker looks for due schedules.
    ``reconcile_interval_s``: how often the reconciler asks the ledger for
    orphaned runs. ``orphan_grace_s``: how long a dispatched run may go
    unclaimed before it is dispatched again (also the pause between two
    redispatches of one run by this replica, and how long a suspended run must
    be left alone before the sweep looks at it). ``suspended_sweep_interval_s``:
    how often suspended runs are checked for a decided approval (needs
    ``approvals_addr``).
    """

    server: ServerSettings
    client: ClientSettings
    database_url: str
    nats: NatsSettings
    ledger_addr: str
    schema: str = "scheduler"
    tick_interval_s: float = 1.0
    reconcile_interval_s: float = 10.0
    orphan_grace_s: float = 30.0
    watch_poll_s: float = 5.0
    #: ApprovalsService, read by the sweep of suspended runs; empty: no sweep
    approvals_addr: str = ""
    #: how often SUSPENDED runs are checked for an approval decided without
    #: their being dispatched (a lost ApprovalDecided event)
    suspended_sweep_interval_s: float = 60.0
    #: whether ApprovalDecided events dispatch suspended runs
    approval_listener: bool = True

    @classmethod
    def from_env(cls, env: Env) -> SchedulerSettings:
        return cls(
            server=ServerSettings.from_env(env, service="scheduler"),
            client=ClientSettings.from_env(env),
            database_url=database_url(env),
            nats=NatsSettings.from_env(env),
            ledger_addr=service_address(env, "LEDGER_ADDR"),
            tick_interval_s=env.number("SCHEDULER_TICK_INTERVAL_S", 1.0),
            reconcile_interval_s=env.number("SCHEDULER_RECONCILE_INTERVAL_S", 10.0),
            orphan_grace_s=env.number("SCHEDULER_ORPHAN_GRACE_S", 30.0, minimum=0.001),
            watch_poll_s=env.number("SCHEDULER_WATCH_POLL_S", 5.0, minimum=0.01),
            approvals_addr=service_address(env, "APPROVALS_ADDR")
            if env.optional("APPROVALS_ADDR")
            else "",
            suspended_sweep_interval_s=env.number("SCHEDULER_SUSPENDED_SWEEP_INTERVAL_S", 60.0),
        )
