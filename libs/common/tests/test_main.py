"""The shared service entry point."""

from __future__ import annotations

import subprocess
import sys

from stepline.common.main import GC_YOUNG_THRESHOLD


def test_services_freeze_their_start_up_objects_and_collect_young_ones_less_often() -> None:
    probe = (
        "import gc; from stepline.common.main import tune_gc; tune_gc(); "
        "print(gc.get_freeze_count(), *gc.get_threshold())"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.split()
    frozen, young, *_ = map(int, out)
    assert frozen > 10_000  # the imported modules' objects, at least
    assert young == GC_YOUNG_THRESHOLD
