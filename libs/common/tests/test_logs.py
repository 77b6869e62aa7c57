"""configure_logging: one root handler, noisy third-party loggers held at WARNING."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from stepline.common.logs import QUIET_LOGGERS, configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    yield
    root.handlers[:], root.level = saved
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_httpx_urls_stay_out_of_info_logs() -> None:
    configure_logging(service="test", level="debug")
    assert logging.getLogger().level == logging.DEBUG
    assert set(QUIET_LOGGERS) == {"httpx", "httpcore"}
    for name in QUIET_LOGGERS:
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)
        assert logging.getLogger(name).isEnabledFor(logging.WARNING)
    assert not logging.getLogger("httpcore.connection").isEnabledFor(logging.INFO)
