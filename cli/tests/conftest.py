"""Shared by the CLI tests that run against a real mesh (``stepline up``): the
mesh for a module, and ``cli``, the command line run in-process against it.
A module defines its own ``state`` fixture with :func:`started_mesh`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from stepline.cli import mesh
from stepline.cli.__main__ import run_async

Cli = Callable[..., Awaitable[tuple[int, str, str]]]


@contextlib.contextmanager
def started_mesh(
    tmp_path_factory: pytest.TempPathFactory, **options: Any
) -> Iterator[mesh.MeshState]:
    """``mesh.up`` with ``options`` in a fresh state directory, stopped afterwards."""
    state_dir = tmp_path_factory.mktemp("mesh")
    started = mesh.up(state_dir, progress=lambda _msg: None, **options)
    try:
        yield started
    finally:
        mesh.down(state_dir, progress=lambda _msg: None)


@pytest.fixture
def cli(state: mesh.MeshState, capsys: pytest.CaptureFixture[str]) -> Cli:
    """``await cli("devices", "list", "--as", "operator")`` -> (status, stdout, stderr),
    with the module's mesh found through its state directory only."""

    async def call(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await run_async(["--state-dir", str(state.state_dir), *argv], environ={})
        out, err = capsys.readouterr()
        return code, out, err

    return call


async def json_of(cli: Cli, *argv: str) -> Any:
    """The command's ``--json`` output, parsed (it must succeed)."""
    code, out, err = await cli(*argv, "--json")
    assert code == 0, err
    return json.loads(out)
