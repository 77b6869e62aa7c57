"""What the broker does on phones through adb: inventory, health checks, cleanup.

Everything here is blocking (adbutils is synchronous): the broker calls it with
``asyncio.to_thread``, never on the event loop. Every adb server connection is
made through :func:`stepline.common.adb.client`, which probes the server first
(so adbutils never starts an adb server of its own).

Commands run in batches: one ``adb shell`` script runs several commands and
reports each one's output and exit status (each command is followed by a
marker ``echo`` carrying ``$?``), which keeps a health check to one round trip
and a cleanup to two. Every command is recorded (command, exit status, output)
so that a failed check or cleanup leaves evidence a person can read.
"""

from __future__ import annotations

import re
import secrets
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import adbutils

from stepline.common import adb
from stepline.common.errors import Unavailable
from stepline.device_broker.config import HealthThresholds

OUTPUT_LIMIT = 2000
HOME_KEYCODE = 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PACKAGE_RE = re.compile(r"^package:(\S+)\s*$", re.MULTILINE)
_BATTERY_RE = re.compile(r"^\s*level:\s*(\d+)\s*$", re.MULTILINE)
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}  # in KiB


@dataclass(frozen=True)
class Seen:
    """A device as an adb server lists it (``adb devices -l``)."""

    serial: str
    state: str  # device | offline | unauthorized | ...
    adb_server: str
    model: str = ""
    product: str = ""

    @property
    def online(self) -> bool:
        return self.state == "device"


@dataclass(frozen=True)
class Command:
    """One shell command run on a device, as evidence."""

    command: str
    exit_code: int  # -1: no exit status (adb failed, or the script stopped before it)
    output: str

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "exit_code": self.exit_code, "output": self.output}


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "message": self.message}


@dataclass
class Report:
    """Checks and the commands behind them (a health check or a cleanup)."""

    checks: list[Check] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    #: adb lost the device while working on it (dropped, or hung past the timeout)
    unreachable: bool = False

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def check(self, name: str, passed: bool, message: str) -> bool:
        self.checks.append(Check(name, passed, message))
        return passed

    def failed_checks(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def to_json(self) -> dict[str, Any]:
        return {
            "checks": [check.to_json() for check in self.checks],
            "commands": [command.to_json() for command in self.commands],
        }


def _clip(text: str) -> str:
    return text if len(text) <= OUTPUT_LIMIT else text[:OUTPUT_LIMIT] + "...[truncated]"


class Unreachable(Exception):
    """adb could not talk to the device (dropped, hung past the timeout)."""


class Shell:
    """Runs recorded shell commands on one device."""

    def __init__(self, device: adbutils.AdbDevice, report: Report, *, timeout_s: float) -> None:
        self.device = device
        self.report = report
        self.timeout_s = timeout_s

    def batch(self, commands: Sequence[str]) -> list[Command]:
        """Run ``commands`` in order in one shell; each one's output and exit status."""
        marker = f"@stepline-{secrets.token_hex(4)}@"
        script = "; ".join(f'{command}; echo "{marker}$?"' for command in commands)
        try:
            result = self.device.shell2(script, timeout=self.timeout_s, v2=True)
        except (adbutils.AdbError, OSError) as exc:
            self.report.unreachable = True
            self.report.commands.extend(
                Command(command, -1, _clip(f"adb error: {exc}")) for command in commands
            )
            raise Unreachable(str(exc)) from exc
        done = _split(commands, str(result.output), marker)
        self.report.commands.extend(done)
        return done

    def packages(self, listing: Command) -> list[str] | None:
        """The packages of a ``pm list packages`` result (sorted); None if it failed."""
        if listing.exit_code != 0:
            return None
        return sorted(set(_PACKAGE_RE.findall(listing.output)))


def _split(commands: Sequence[str], output: str, marker: str) -> list[Command]:
    pattern = re.compile(re.escape(marker) + r"(\d+)\r?\n?")
    results: list[Command] = []
    position = 0
    for command in commands:
        match = pattern.search(output, position)
        if match is None:
            results.append(Command(command, -1, _clip(output[position:] or "(no result)")))
            position = len(output)
            continue
        text = output[position : match.start()]
        results.append(Command(command, int(match.group(1)), _clip(text.rstrip("\r\n"))))
        position = match.end()
    return results


class Phones:
    """adb access to the devices of the broker's adb servers."""

    def __init__(self, servers: Iterable[tuple[str, int]], *, timeout_s: float) -> None:
        self.servers = [f"{host}:{port}" for host, port in servers]
        self.timeout_s = timeout_s

    def client(self, server: str) -> adbutils.AdbClient:
        """A client of ``server`` after probing that it answers (Unavailable if not)."""
        host, _, port = server.rpartition(":")
        return adb.client(host, int(port), timeout_s=self.timeout_s)

    def device(self, server: str, serial: str) -> adbutils.AdbDevice:
        return self.client(server).device(serial)

    # --- inventory -------------------------------------------------------------------

    def devices(self, server: str) -> list[Seen]:
        """Devices the adb server knows, with their state and product tags."""
        infos = self.client(server).list(extended=True)
        return [
            Seen(
                serial=info.serial,
                state=info.state,
                adb_server=server,
                model=info.tags.get("model", "").replace("_", " "),
                product=info.tags.get("product", ""),
            )
            for info in infos
        ]

    def connect(self, address: str) -> str:
        """``adb connect`` through the first adb server; returns adb's answer."""
        answer: str = self.client(self.servers[0]).connect(address, timeout=self.timeout_s)
        return answer

    def disconnect(self, address: str) -> None:
        self.client(self.servers[0]).disconnect(address)

    def adb_state(self, server: str, serial: str) -> str | None:
        """The device's state as its adb server reports it (answered by the adb
        server, not the device); None if the server does not list it."""
        try:
            state: str = self.device(server, serial).get_state()
        except (Unavailable, adbutils.AdbError, OSError):
            return None
        return state

    def describe(self, server: str, serial: str) -> tuple[str, str]:
        """``ro.product.model`` and ``ro.product.name`` of a device."""
        shell = Shell(self.device(server, serial), Report(), timeout_s=self.timeout_s)
        model, product = shell.batch(["getprop ro.product.model", "getprop ro.product.name"])
        return model.output.strip(), product.output.strip()

    # --- health ----------------------------------------------------------------------

    def health(
        self, server: str, serial: str, thresholds: HealthThresholds, *, full: bool = False
    ) -> Report:
        """Health checks; ``full`` adds responsiveness checks (after a device fault)."""
        report = Report()
        try:
            shell = Shell(self.device(server, serial), report, timeout_s=self.timeout_s)
            health_checks(shell, thresholds, full=full)
        except (Unreachable, Unavailable, adbutils.AdbError, OSError) as exc:
            report.unreachable = True
            report.check("adb_reachable", False, f"adb cannot reach the device: {exc}")
        finally:
            report.finished = time.time()
        return report

    # --- cleanup ---------------------------------------------------------------------

    def clean(
        self,
        server: str,
        serial: str,
        *,
        profile: str,
        baseline: list[str] | None,
        session_dirs: Iterable[str],
        accept_missing: bool = False,
    ) -> tuple[Report, list[str]]:
        """Run the cleanup ``profile`` and verify it; returns the report and the
        package list of the cleaned device (the new baseline when it passed).

        With no ``baseline`` (a device seen for the first time) nothing is
        uninstalled and the device's current packages become the baseline.
        ``accept_missing`` (an operator returning a device) accepts baseline
        packages that are gone; packages beyond the baseline are still removed.
        """
        report = Report()
        packages: list[str] = []
        try:
            shell = Shell(self.device(server, serial), report, timeout_s=self.timeout_s)
            packages = cleanup(
                shell,
                profile=profile,
                baseline=baseline,
                session_dirs=list(session_dirs),
                accept_missing=accept_missing,
            )
        except (Unreachable, Unavailable, adbutils.AdbError, OSError) as exc:
            report.unreachable = True
            report.check("adb_reachable", False, f"adb cannot reach the device: {exc}")
        finally:
            report.finished = time.time()
        return report, packages


# --- checks (blocking; each raises Unreachable when adb loses the device) -------------


def health_checks(shell: Shell, thresholds: HealthThresholds, *, full: bool) -> None:
    report = shell.report
    commands = ["getprop sys.boot_completed", "dumpsys battery", "df /data"]
    if full:
        commands += ["echo stepline-health", "dumpsys window"]
    boot, battery, df, *more = shell.batch(commands)
    report.check("adb_reachable", True, "the device runs shell commands")
    value = boot.output.strip()
    report.check(
        "boot_completed",
        boot.exit_code == 0 and value == "1",
        f"sys.boot_completed={value!r}" if boot.exit_code == 0 else boot.output,
    )
    level = _battery_level(battery.output) if battery.exit_code == 0 else None
    report.check(
        "battery",
        level is not None and level >= thresholds.min_battery_pct,
        f"level {level}%, minimum {thresholds.min_battery_pct}%"
        if level is not None
        else f"no battery level in: {battery.output[:200]!r}",
    )
    free_kib = _free_kib(df.output) if df.exit_code == 0 else None
    report.check(
        "storage_free",
        free_kib is not None and free_kib >= thresholds.min_storage_free_mb * 1024,
        f"{free_kib // 1024} MiB free on /data, minimum {thresholds.min_storage_free_mb} MiB"
        if free_kib is not None
        else f"no free space in: {df.output[:200]!r}",
    )
    if full:
        echo, window = more
        report.check(
            "shell_responsive",
            echo.exit_code == 0 and echo.output.strip() == "stepline-health",
            f"echo answered {echo.output.strip()[:100]!r}",
        )
        report.check(
            "window_manager", window.exit_code == 0, f"dumpsys window exit {window.exit_code}"
        )
        report.check(*_screencap(shell))


def _screencap(shell: Shell) -> tuple[str, bool, str]:
    try:
        data = shell.device.shell("screencap -p", encoding=None, timeout=shell.timeout_s)
    except (adbutils.AdbError, OSError) as exc:
        shell.report.commands.append(Command("screencap -p", -1, f"adb error: {exc}"))
        shell.report.unreachable = True
        raise Unreachable(str(exc)) from exc
    ok = isinstance(data, bytes) and data.startswith(PNG_MAGIC)
    size = len(data) if isinstance(data, bytes) else 0
    shell.report.commands.append(Command("screencap -p", 0, f"{size} bytes"))
    return "screen_capture", ok, f"{size} bytes, {'PNG' if ok else 'not a PNG'}"


def _battery_level(output: str) -> int | None:
    match = _BATTERY_RE.search(output)
    return int(match.group(1)) if match else None


def _free_kib(output: str) -> int | None:
    """Free KiB from ``df`` output (1K blocks, or sizes with K/M/G suffixes)."""
    lines = [line.split() for line in output.strip().splitlines() if line.strip()]
    if len(lines) < 2:
        return None
    header = [name.lower() for name in lines[0]]
    column = next((i for i, name in enumerate(header) if name in ("available", "avail", "free")), 3)
    row = lines[-1]  # "Mounted on" is two header words: index from the left
    if column >= len(row):
        return None
    match = _SIZE_RE.match(row[column])
    if match is None:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def cleanup(
    shell: Shell,
    *,
    profile: str,
    baseline: list[str] | None,
    session_dirs: list[str],
    accept_missing: bool,
) -> list[str]:
    """The cleanup steps of ``profile`` and their verification (see :meth:`Phones.clean`)."""
    report = shell.report
    standard = profile == "standard"
    listings = shell.batch(
        ["pm list packages", "pm list packages -3"] if standard else ["pm list packages"]
    )
    before = shell.packages(listings[0])
    if before is None:
        report.check("packages_listed", False, "pm list packages failed")
        return []
    if profile == "none":
        return before
    extra = sorted(set(before) - set(baseline)) if baseline is not None else []
    to_clear: list[str] = []
    if standard:
        third_party = shell.packages(listings[1])
        if third_party is None:
            report.check("apps_cleared", False, "pm list packages -3 failed")
        else:
            to_clear = [p for p in third_party if p not in extra]
    steps = [f"pm uninstall {shlex.quote(package)}" for package in extra]
    steps += [f"rm -rf {shlex.quote(folder)}" for folder in session_dirs]
    steps += [f"pm clear {shlex.quote(package)}" for package in to_clear]
    steps += [f"input keyevent {HOME_KEYCODE}", "pm list packages"]
    steps += [f"ls {shlex.quote(folder)}" for folder in session_dirs]
    results = shell.batch(steps)
    by_command = dict(zip(steps, results, strict=True))
    if standard and listings[1].exit_code == 0:
        failed = [
            package
            for package in to_clear
            if by_command[f"pm clear {shlex.quote(package)}"].exit_code != 0
            or "success" not in by_command[f"pm clear {shlex.quote(package)}"].output.lower()
        ]
        report.check(
            "apps_cleared",
            not failed,
            f"pm clear failed for {', '.join(failed)}"
            if failed
            else f"cleared {len(to_clear)} app(s)",
        )
    home = by_command[f"input keyevent {HOME_KEYCODE}"]
    report.check(
        "home", home.exit_code == 0, f"input keyevent {HOME_KEYCODE} exit {home.exit_code}"
    )
    after = shell.packages(by_command["pm list packages"])
    if after is None:
        report.check("packages_restored", False, "pm list packages failed after cleanup")
        return []
    if baseline is not None:
        left = sorted(set(after) - set(baseline))
        missing = [] if accept_missing else sorted(set(baseline) - set(after))
        report.check(
            "packages_restored",
            not left and not missing,
            "package list equals the baseline"
            if not left and not missing
            else f"still installed: {left or 'none'};"
            f" missing from the baseline: {missing or 'none'}",
        )
    remaining = [
        folder for folder in session_dirs if _exists(by_command[f"ls {shlex.quote(folder)}"])
    ]
    report.check(
        "session_files_removed",
        not remaining,
        f"still present: {', '.join(remaining)}" if remaining else "session folders removed",
    )
    return after


def _exists(listing: Command) -> bool:
    return listing.exit_code == 0 and "no such file" not in listing.output.lower()
