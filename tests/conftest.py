"""The embedded mesh, started once for the end-to-end tests of this folder.

``stepline up`` as real processes (PostgreSQL, nats-server, adb, the five
services and two executors) in a temporary state directory, with short claim
leases and a quick reconciler so that a killed executor's run is taken over in
seconds rather than the production half-minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stepline.cli import mesh

EXECUTORS = 2

#: settings for every service of the test mesh (defaults: 30 s lease and ack
#: wait, a reconcile pass every 10 s, a 30 s grace before a redispatch)
FAST_RECOVERY = {
    "STEPLINE_EXECUTOR_LEASE_S": "3",
    "STEPLINE_EXECUTOR_ACK_WAIT_S": "3",
    "STEPLINE_SCHEDULER_RECONCILE_INTERVAL_S": "0.5",
    "STEPLINE_SCHEDULER_ORPHAN_GRACE_S": "2",
    "STEPLINE_SCHEDULER_WATCH_POLL_S": "0.5",
}


@pytest.fixture(scope="session")
def mesh_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[mesh.MeshState]:
    """The running mesh's state (endpoints, pids, admin token); stopped at the end."""
    state_dir: Path = tmp_path_factory.mktemp("mesh")
    state = mesh.up(state_dir, executors=EXECUTORS, env=FAST_RECOVERY, progress=lambda _msg: None)
    try:
        yield state
    finally:
        mesh.down(state_dir, progress=lambda _msg: None)
