"""The simulated phone's state: everything a shell command or a sync request can see.

A ``PhoneModel`` is plain data. The phone's protocol thread changes it while
holding ``lock``; tests and tools may read it (``to_json()`` takes the lock) or
change it under the same lock.
"""

from __future__ import annotations

import hashlib
import posixpath
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

FAULTS = frozenset({"drop", "hang", "no_boot", "low_battery", "storage_full", "cleanup_fail"})
"""Fault names ``simctl fault set`` accepts (see docs/phone.md)."""

LOW_BATTERY_LEVEL = 5

LAUNCHER_PACKAGE = "com.android.launcher3"
LAUNCHER_ACTIVITY = ".Launcher"
SOCIAL_PACKAGE = "com.stepline.social"
SOCIAL_ACTIVITY = ".MainActivity"

SYSTEM_PACKAGES = (
    "android",
    "com.android.settings",
    "com.android.shell",
    "com.android.systemui",
    LAUNCHER_PACKAGE,
)

DEFAULT_DIRS = (
    "/",
    "/data",
    "/data/local",
    "/data/local/tmp",
    "/sdcard",
    "/sdcard/DCIM",
    "/sdcard/Download",
    "/system",
    "/system/bin",
)

GIB = 1024 * 1024 * 1024


def normpath(path: str, cwd: str = "/") -> str:
    """An absolute, normalised device path (no trailing slash except for ``/``)."""
    joined = posixpath.join(cwd, path) if not path.startswith("/") else path
    result = posixpath.normpath(joined)
    return "/" if result in ("", ".", "//") else result


@dataclass
class Package:
    version: str
    installed_at: float
    system: bool = False
    activity: str = SOCIAL_ACTIVITY

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "installed_at": self.installed_at,
            "system": self.system,
            "activity": self.activity,
        }


@dataclass(frozen=True)
class InputEvent:
    """One ``input`` command as the phone received it."""

    time: float
    kind: str  # tap | swipe | text | keyevent
    args: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "kind": self.kind, "args": list(self.args)}


@dataclass(frozen=True)
class Post:
    author: str
    text: str
    time: float

    def to_json(self) -> dict[str, Any]:
        return {"author": self.author, "text": self.text, "time": self.time}


@dataclass
class AppState:
    """State of the simulated app ``com.stepline.social`` (logic in ``stepline.phone.app``)."""

    screen: str = "login"  # login | feed | compose
    fields: dict[str, str] = field(
        default_factory=lambda: {"username": "", "password": "", "post": ""}
    )
    focus: str | None = None  # the field ``input text`` types into
    user: str | None = None  # the signed-in account
    message: str = ""  # an error shown on the current screen
    scroll: int = 0  # feed scroll offset in pixels
    posts: list[Post] = field(default_factory=list)

    def reset_ui(self) -> None:
        self.screen = "feed" if self.user else "login"
        self.fields = {"username": "", "password": "", "post": ""}
        self.focus = None
        self.message = ""
        self.scroll = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "screen": self.screen,
            "fields": dict(self.fields),
            "focus": self.focus,
            "user": self.user,
            "message": self.message,
            "scroll": self.scroll,
            "posts": [post.to_json() for post in self.posts],
        }


def _default_packages() -> dict[str, Package]:
    now = time.time()
    packages = {name: Package("1", now, system=True, activity="") for name in SYSTEM_PACKAGES}
    packages[LAUNCHER_PACKAGE].activity = LAUNCHER_ACTIVITY
    packages[SOCIAL_PACKAGE] = Package("1.0", now)
    return packages


@dataclass
class PhoneModel:
    """One simulated phone. Every field is inspectable; ``to_json()`` is what
    ``simctl state`` prints."""

    serial_name: str = field(default_factory=lambda: f"stepline-sim-{secrets.token_hex(3)}")
    model: str = "Pixel 7"
    product: str = "stepline_sim"
    device: str = "stepline"
    sdk: int = 34
    release: str = "14"
    screen_width: int = 1080
    screen_height: int = 2400
    battery_level: int = 85
    boot_completed: bool = True
    storage_total: int = 64 * GIB
    storage_free: int = 48 * GIB
    packages: dict[str, Package] = field(default_factory=_default_packages)
    foreground_package: str = LAUNCHER_PACKAGE
    foreground_activity: str = LAUNCHER_ACTIVITY
    running: set[str] = field(default_factory=set)  # started apps (not force-stopped)
    files: dict[str, bytes] = field(default_factory=dict)
    file_times: dict[str, int] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=lambda: set(DEFAULT_DIRS))
    accounts: set[str] = field(default_factory=set)
    app: AppState = field(default_factory=AppState)
    input_log: list[InputEvent] = field(default_factory=list)
    faults: set[str] = field(default_factory=set)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    # --- derived state, as the phone reports it (faults applied) ---------------------

    def effective_battery(self) -> int:
        return LOW_BATTERY_LEVEL if "low_battery" in self.faults else self.battery_level

    def effective_boot_completed(self) -> bool:
        return self.boot_completed and "no_boot" not in self.faults

    def effective_storage_free(self) -> int:
        return 0 if "storage_full" in self.faults else max(0, self.storage_free)

    def properties(self) -> dict[str, str]:
        return {
            "ro.product.model": self.model,
            "ro.product.name": self.product,
            "ro.product.device": self.device,
            "ro.product.manufacturer": "Stepline",
            "ro.product.brand": "stepline",
            "ro.serialno": self.serial_name,
            "ro.build.version.sdk": str(self.sdk),
            "ro.build.version.release": self.release,
            "ro.build.type": "userdebug",
            "ro.debuggable": "1",
            "ro.product.cpu.abi": "x86_64",
            "ro.kernel.qemu": "0",
            "sys.boot_completed": "1" if self.effective_boot_completed() else "0",
            "init.svc.bootanim": "stopped" if self.effective_boot_completed() else "running",
        }

    # --- files ----------------------------------------------------------------------

    def is_dir(self, path: str) -> bool:
        return normpath(path) in self.dirs

    def is_file(self, path: str) -> bool:
        return normpath(path) in self.files

    def list_dir(self, path: str) -> list[str]:
        """Names directly inside directory ``path`` (sorted)."""
        base = normpath(path)
        prefix = base if base.endswith("/") else base + "/"
        names = {
            entry[len(prefix) :].split("/", 1)[0]
            for entry in (*self.dirs, *self.files)
            if entry.startswith(prefix) and entry != base
        }
        return sorted(names)

    def make_dirs(self, path: str) -> None:
        """Create ``path`` and its parents; NotADirectoryError when one is a file."""
        current = normpath(path)
        parent = current
        while parent not in self.dirs:
            if parent in self.files:
                raise NotADirectoryError(f"{parent}: Not a directory")
            parent = posixpath.dirname(parent)
        while current not in self.dirs:
            self.dirs.add(current)
            current = posixpath.dirname(current)

    def write_file(self, path: str, data: bytes, *, mtime: int | None = None) -> None:
        """Store a file, creating parent directories; OSError when storage is full."""
        path = normpath(path)
        if path in self.dirs:
            raise IsADirectoryError(f"{path}: Is a directory")
        old = len(self.files.get(path, b""))
        if len(data) - old > self.effective_storage_free():
            raise OSError(f"{path}: No space left on device")
        self.make_dirs(posixpath.dirname(path))
        self.files[path] = bytes(data)
        self.file_times[path] = int(time.time()) if mtime is None else mtime
        self.storage_free -= len(data) - old

    def remove_file(self, path: str) -> None:
        path = normpath(path)
        data = self.files.pop(path)
        self.file_times.pop(path, None)
        self.storage_free += len(data)

    def remove_tree(self, path: str) -> None:
        base = normpath(path)
        prefix = base.rstrip("/") + "/"
        for name in [f for f in self.files if f == base or f.startswith(prefix)]:
            self.remove_file(name)
        self.dirs -= {d for d in self.dirs if d == base or d.startswith(prefix)}
        self.dirs.add("/")

    # --- snapshot -------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "serial_name": self.serial_name,
                "model": self.model,
                "product": self.product,
                "device": self.device,
                "sdk": self.sdk,
                "screen": [self.screen_width, self.screen_height],
                "battery_level": self.effective_battery(),
                "boot_completed": self.effective_boot_completed(),
                "storage_free": self.effective_storage_free(),
                "packages": {name: pkg.to_json() for name, pkg in sorted(self.packages.items())},
                "foreground": {
                    "package": self.foreground_package,
                    "activity": self.foreground_activity,
                },
                "running": sorted(self.running),
                "files": {
                    path: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                    for path, data in sorted(self.files.items())
                },
                "dirs": sorted(self.dirs),
                "accounts": sorted(self.accounts),
                "app": self.app.to_json(),
                "input_log": [event.to_json() for event in self.input_log],
                "faults": sorted(self.faults),
            }
