"""The shared service entry point."""

from __future__ import annotations

import subprocess
import sys

from stepline.common.main import GC_YOUNG_THRESHOLD

PROBE = """
import gc
from types import SimpleNamespace

from stepline.common.main import run_service

settings = SimpleNamespace(server=SimpleNamespace(log_level="INFO", log_json=False))


async def serve(_settings):  # what a service sees once it serves
    print(gc.get_freeze_count(), *gc.get_threshold())


run_service("probe", lambda env: settings, serve)
"""


def test_services_freeze_their_start_up_objects_and_collect_young_ones_less_often() -> None:
    """Through ``run_service``, the entry point of every service."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], check=True, capture_output=True, text=True
    ).stdout.split()
    frozen, young, *_ = map(int, out)
    assert frozen > 10_000  # the imported modules' objects, at least
    assert young == GC_YOUNG_THRESHOLD
