"""The phone's shell commands (what ``adb shell`` can run), printing what Android prints.

Each command is ``fn(ctx, args) -> exit status``. ``COMMANDS`` maps names to them.
"""

from __future__ import annotations

import html
import json
import posixpath
import re
import struct
import time
from collections.abc import Callable
from datetime import datetime

from stepline.phone import app
from stepline.phone.apk import ApkError, read_apk
from stepline.phone.model import (
    FAULTS,
    LAUNCHER_PACKAGE,
    InputEvent,
    Package,
    PhoneModel,
    normpath,
)
from stepline.phone.shell import CommandFn, Context, ShellExit, writable

COMMANDS: dict[str, CommandFn] = {}


def command(*names: str) -> Callable[[CommandFn], CommandFn]:
    def register(function: CommandFn) -> CommandFn:
        for name in names:
            COMMANDS[name] = function
        return function

    return register


def _not_booted(ctx: Context, service: str) -> int | None:
    """Framework services are not up before boot completes (the ``no_boot`` fault)."""
    if ctx.model.effective_boot_completed():
        return None
    return ctx.error(f"cmd: Can't find service: {service}", 20)


# --- basics ---------------------------------------------------------------------------


@command("true")
def _true(ctx: Context, args: list[str]) -> int:
    return 0


@command("false")
def _false(ctx: Context, args: list[str]) -> int:
    return 1


@command("exit")
def _exit(ctx: Context, args: list[str]) -> int:
    try:
        status = int(args[0]) if args else ctx.shell.status
    except ValueError:
        return ctx.error(f"/system/bin/sh: exit: bad number: {args[0]}", 2)
    raise ShellExit(status)


@command("echo")
def _echo(ctx: Context, args: list[str]) -> int:
    newline = True
    if args and args[0] == "-n":
        newline, args = False, args[1:]
    ctx.out.write(" ".join(args) + ("\n" if newline else ""))
    return 0


@command("id")
def _id(ctx: Context, args: list[str]) -> int:
    ctx.out.write("uid=2000(shell) gid=2000(shell) groups=2000(shell) context=u:r:shell:s0\n")
    return 0


@command("whoami")
def _whoami(ctx: Context, args: list[str]) -> int:
    ctx.out.write("shell\n")
    return 0


@command("pwd")
def _pwd(ctx: Context, args: list[str]) -> int:
    ctx.out.write("/\n")
    return 0


@command("getprop")
def _getprop(ctx: Context, args: list[str]) -> int:
    props = ctx.model.properties()
    if not args:
        ctx.out.write("".join(f"[{k}]: [{v}]\n" for k, v in sorted(props.items())))
    else:
        default = args[1] if len(args) > 1 else ""
        ctx.out.write(props.get(args[0], default) + "\n")
    return 0


@command("grep")
def _grep(ctx: Context, args: list[str]) -> int:
    flags: set[str] = set()
    while args and args[0].startswith("-") and len(args[0]) > 1:
        flags.update(args.pop(0)[1:])
    if not args:
        return ctx.error("usage: grep [-ivFq] PATTERN [FILE...]", 2)
    pattern = re.escape(args[0]) if "F" in flags else args[0]
    try:
        regex = re.compile(pattern, re.IGNORECASE if "i" in flags else 0)
    except re.error as exc:
        return ctx.error(f"grep: bad regex: {exc}", 2)
    sources = [ctx.model.files.get(normpath(path), b"") for path in args[1:]] or [ctx.stdin]
    found = False
    for data in sources:
        for line in data.decode(errors="replace").splitlines():
            if bool(regex.search(line)) != ("v" in flags):
                found = True
                if "q" not in flags:
                    ctx.out.write(line + "\n")
    return 0 if found else 1


@command("wm")
def _wm(ctx: Context, args: list[str]) -> int:
    if args[:1] == ["size"]:
        ctx.out.write(f"Physical size: {ctx.model.screen_width}x{ctx.model.screen_height}\n")
    elif args[:1] == ["density"]:
        ctx.out.write("Physical density: 420\n")
    else:
        return ctx.error("Error: unknown wm command", 1)
    return 0


# --- files ----------------------------------------------------------------------------


@command("cat")
def _cat(ctx: Context, args: list[str]) -> int:
    if not args:
        ctx.out.write(ctx.stdin)
        return 0
    status = 0
    for name in args:
        path = normpath(name)
        if ctx.model.is_dir(path):
            status = ctx.error(f"cat: {name}: Is a directory")
        elif path not in ctx.model.files:
            status = ctx.error(f"cat: {name}: No such file or directory")
        else:
            ctx.out.write(ctx.model.files[path])
    return status


def _options(args: list[str]) -> tuple[set[str], list[str]]:
    flags: set[str] = set()
    rest: list[str] = []
    for arg in args:
        if arg.startswith("-") and len(arg) > 1 and not rest:
            flags.update(arg[1:])
        else:
            rest.append(arg)
    return flags, rest


def _long_entry(model: PhoneModel, path: str, name: str) -> str:
    if model.is_dir(path):
        mode, size, mtime = "drwxrwx--x", 4096, 0
    else:
        mode, size, mtime = "-rw-rw----", len(model.files[path]), model.file_times.get(path, 0)
    stamp = datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")
    return f"{mode} 1 shell shell {size:>8} {stamp} {name}\n"


@command("ls")
def _ls(ctx: Context, args: list[str]) -> int:
    flags, paths = _options(args)
    model = ctx.model
    status = 0
    for name in paths or ["."]:
        path = normpath(name)
        if path in model.files:
            ctx.out.write(_long_entry(model, path, name) if "l" in flags else name + "\n")
        elif model.is_dir(path):
            if len(paths) > 1:
                ctx.out.write(f"{name}:\n")
            names = model.list_dir(path)
            if "a" in flags:
                names = [".", "..", *names]
            for entry in names:
                full = posixpath.join(path, entry) if entry not in (".", "..") else path
                ctx.out.write(_long_entry(model, full, entry) if "l" in flags else entry + "\n")
        else:
            status = ctx.error(f"ls: {name}: No such file or directory")
    return status


@command("mkdir")
def _mkdir(ctx: Context, args: list[str]) -> int:
    flags, paths = _options(args)
    model = ctx.model
    status = 0
    for name in paths:
        path = normpath(name)
        if path in model.files or (model.is_dir(path) and "p" not in flags):
            status = ctx.error(f"mkdir: '{name}': File exists")
        elif not writable(path):
            status = ctx.error(f"mkdir: '{name}': Permission denied")
        elif "p" not in flags and not model.is_dir(posixpath.dirname(path)):
            status = ctx.error(f"mkdir: '{name}': No such file or directory")
        else:
            try:
                model.make_dirs(path)
            except OSError as exc:
                status = ctx.error(f"mkdir: '{name}': {exc}")
    return status


@command("touch")
def _touch(ctx: Context, args: list[str]) -> int:
    _flags, paths = _options(args)
    status = 0
    for name in paths:
        path = normpath(name)
        if ctx.model.is_dir(path):
            continue
        if not writable(path) or not ctx.model.is_dir(posixpath.dirname(path)):
            status = ctx.error(f"touch: '{name}': No such file or directory")
            continue
        try:
            ctx.model.write_file(path, ctx.model.files.get(path, b""))
        except OSError as exc:
            status = ctx.error(f"touch: '{name}': {exc}")
    return status


@command("rm")
def _rm(ctx: Context, args: list[str]) -> int:
    flags, paths = _options(args)
    model = ctx.model
    recursive, force = bool(flags & {"r", "R"}), "f" in flags
    status = 0
    if not paths and not force:
        return ctx.error("rm: Need 1 argument")
    for name in paths:
        path = normpath(name)
        exists = path in model.files or model.is_dir(path)
        if not exists:
            if not force:
                status = ctx.error(f"rm: {name}: No such file or directory")
        elif "cleanup_fail" in model.faults:
            status = ctx.error(f"rm: {name}: Device or resource busy")
        elif not writable(path) or path in ("/sdcard", "/data/local/tmp"):
            status = ctx.error(f"rm: {name}: Permission denied")
        elif path in model.files:
            model.remove_file(path)
        elif not recursive:
            status = ctx.error(f"rm: {name}: Is a directory")
        else:
            model.remove_tree(path)
    return status


# --- system services ------------------------------------------------------------------


@command("df")
def _df(ctx: Context, args: list[str]) -> int:
    model = ctx.model
    total_k = model.storage_total // 1024
    free_k = model.effective_storage_free() // 1024
    used_k = total_k - free_k
    percent = round(100 * used_k / total_k) if total_k else 100
    ctx.out.write("Filesystem       1K-blocks     Used Available Use% Mounted on\n")
    _flags, paths = _options(args)
    mounts = {"/data": "/dev/block/dm-5", "/sdcard": "/dev/fuse"}
    for name in paths or ["/data"]:
        path = normpath(name)
        mount = "/sdcard" if path.startswith(("/sdcard", "/storage")) else "/data"
        ctx.out.write(
            f"{mounts[mount]:<16} {total_k:>9} {used_k:>8} {free_k:>9} {percent:>3}% {mount}\n"
        )
    return 0


@command("dumpsys")
def _dumpsys(ctx: Context, args: list[str]) -> int:
    model = ctx.model
    service = args[0] if args else ""
    if service == "battery":
        level = model.effective_battery()
        ctx.out.write(
            "Current Battery Service state:\n"
            "  AC powered: false\n  USB powered: true\n  Wireless powered: false\n"
            "  Max charging current: 500000\n  Max charging voltage: 5000000\n"
            "  Charge counter: 2500000\n"
            f"  status: {5 if level >= 100 else 2}\n  health: 2\n  present: true\n"
            f"  level: {level}\n  scale: 100\n  voltage: 4200\n  temperature: 250\n"
            "  technology: Li-ion\n"
        )
    elif service == "window":
        focus = f"{model.foreground_package}/{_full_activity(model)}"
        ctx.out.write(
            "WINDOW MANAGER WINDOWS (dumpsys window windows)\n"
            f"  mCurrentFocus=Window{{5a1d2c u0 {focus}}}\n"
            f"  mFocusedApp=ActivityRecord{{8e3f1a u0 {focus} t12}}\n"
        )
    elif service == "activity":
        focus = f"{model.foreground_package}/{_full_activity(model)}"
        ctx.out.write(
            f"  mResumedActivity: ActivityRecord{{8e3f1a u0 {focus} t12}}\n"
            f"  ACTIVITY {focus} 8e3f1a pid=4242\n"
        )
    elif service == "display":
        w, h = model.screen_width, model.screen_height
        ctx.out.write(
            "DISPLAY MANAGER (dumpsys display)\n"
            f"  DisplayViewport{{type=INTERNAL, valid=true, isActive=true, displayId=0, "
            f"orientation=0, deviceWidth={w}, deviceHeight={h}}}\n"
        )
    elif service == "power":
        ctx.out.write("POWER MANAGER (dumpsys power)\n  mHoldingDisplaySuspendBlocker=true\n")
    elif service == "package" and len(args) > 1:
        package = model.packages.get(args[1])
        if package is not None:
            stamp = datetime.fromtimestamp(package.installed_at).strftime("%Y-%m-%d %H:%M:%S")
            ctx.out.write(
                f"Packages:\n  Package [{args[1]}]:\n    versionCode=1 minSdk=26 targetSdk=34\n"
                f"    versionName={package.version}\n    pkgFlags=[ HAS_CODE ALLOW_BACKUP ]\n"
                f"    firstInstallTime={stamp}\n    lastUpdateTime={stamp}\n"
            )
    elif service:
        ctx.out.write(f"Can't find service: {service}\n")
    return 0


def _full_activity(model: PhoneModel) -> str:
    activity = model.foreground_activity
    return model.foreground_package + activity if activity.startswith(".") else activity


@command("screencap")
def _screencap(ctx: Context, args: list[str]) -> int:
    flags: set[str] = set()
    rest: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == "-d":
            skip = True  # the display id: the phone has one display
        elif arg.startswith("-") and len(arg) > 1:
            flags.update(arg[1:])
        else:
            rest = args[i:]
            break
    if rest:
        path = normpath(rest[0])
        png = "p" in flags or path.endswith(".png")
        data = app.screenshot_png(ctx.model) if png else _raw_screen(ctx.model)
        if not writable(path) or not ctx.model.is_dir(posixpath.dirname(path)):
            return ctx.error(f"Error opening file: {rest[0]} (No such file or directory)")
        try:
            ctx.model.write_file(path, data)
        except OSError as exc:
            return ctx.error(f"Error writing file: {exc}")
        return 0
    ctx.out.write(app.screenshot_png(ctx.model) if "p" in flags else _raw_screen(ctx.model))
    return 0


def _raw_screen(model: PhoneModel) -> bytes:
    """screencap's raw format: width, height, format (1 = RGBA_8888), colour space, pixels."""
    image = app.render(model).convert("RGBA")
    return struct.pack("<4I", image.width, image.height, 1, 0) + image.tobytes()


@command("uiautomator")
def _uiautomator(ctx: Context, args: list[str]) -> int:
    if args[:1] != ["dump"]:
        return ctx.error("Usage: uiautomator dump [FILE]")
    path = normpath(args[1]) if len(args) > 1 else "/sdcard/window_dump.xml"
    nodes = []
    fields = ctx.model.app.fields if app.current_screen(ctx.model) in ("login", "compose") else {}
    for index, (name, rect) in enumerate(app.targets(ctx.model).items()):
        bounds = f"[{rect.left},{rect.top}][{rect.right},{rect.bottom}]"
        text = fields.get(name, "")
        text = "*" * len(text) if name == "password" else text
        nodes.append(
            f'<node index="{index}" resource-id="{ctx.model.foreground_package}:id/{name}" '
            f'text="{html.escape(text)}" class="android.view.View" '
            f'package="{ctx.model.foreground_package}" clickable="true" bounds="{bounds}" />'
        )
    xml = (
        "<?xml version='1.0' encoding='UTF-8' standalone='yes' ?><hierarchy rotation=\"0\">"
        + "".join(nodes)
        + "</hierarchy>"
    )
    try:
        ctx.model.write_file(path, xml.encode())
    except OSError as exc:
        return ctx.error(f"ERROR: {exc}")
    ctx.out.write(f"UI hierchary dumped to: {path}\n")
    return 0


# --- packages and activities ----------------------------------------------------------


@command("pm")
def _pm(ctx: Context, args: list[str]) -> int:
    if (failed := _not_booted(ctx, "package")) is not None:
        return failed
    sub, rest = (args[0], args[1:]) if args else ("", [])
    handler = _PM.get(sub)
    if handler is None:
        return ctx.error(f"Unknown command: {sub or '(none)'}\nusage: pm list|path|install|...", 1)
    return handler(ctx, rest)


def _pm_list(ctx: Context, args: list[str]) -> int:
    if args[:1] != ["packages"]:
        return ctx.error("Error: unknown list type", 1)
    flags, rest = _options([a for a in args[1:] if a not in ("--user", "0")])
    packages = ctx.model.packages
    for name in sorted(packages):
        system = packages[name].system
        if ("3" in flags and system) or ("s" in flags and not system):
            continue
        if rest and rest[0] not in name:
            continue
        prefix = f"package:/data/app/{name}-1/base.apk=" if "f" in flags else "package:"
        ctx.out.write(prefix + name + "\n")
    return 0


def _pm_path(ctx: Context, args: list[str]) -> int:
    name = args[-1] if args else ""
    if name not in ctx.model.packages:
        return 1
    ctx.out.write(f"package:/data/app/{name}-1/base.apk\n")
    return 0


_PM_INSTALL_FLAGS_WITH_VALUE = ("-i", "--user", "--install-location", "-p", "--originating-uri")


def _pm_install(ctx: Context, args: list[str]) -> int:
    flags: set[str] = set()
    paths: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _PM_INSTALL_FLAGS_WITH_VALUE:
            skip = True
        elif arg.startswith("-"):
            flags.add(arg)
        else:
            paths.append(arg)
    model = ctx.model
    if len(paths) != 1:
        return ctx.error("Error: expected exactly one APK file path", 1)
    path = normpath(paths[0])
    if path not in model.files:
        ctx.err.write(f"Error: Unable to open file: {paths[0]}\n")
        return ctx.error("Consider using a file under /data/local/tmp/", 1)
    try:
        info = read_apk(model.files[path])
    except ApkError as exc:
        ctx.out.write(f"Failure [INSTALL_PARSE_FAILED_NOT_APK: {exc}]\n")
        return 1
    if model.effective_storage_free() < len(model.files[path]):
        ctx.out.write("Failure [INSTALL_FAILED_INSUFFICIENT_STORAGE]\n")
        return 1
    existing = model.packages.get(info.package)
    if existing is not None and existing.system:
        ctx.out.write(
            f"Failure [INSTALL_FAILED_UPDATE_INCOMPATIBLE: {info.package} is a system app]\n"
        )
        return 1
    if existing is not None and "-r" not in flags:
        ctx.out.write(
            f"Failure [INSTALL_FAILED_ALREADY_EXISTS: Attempt to re-install {info.package} "
            "without first uninstalling.]\n"
        )
        return 1
    if existing is not None:
        app.force_stop(model, info.package)
    model.packages[info.package] = Package(info.version, time.time(), activity=info.activity)
    ctx.out.write("Performing Streamed Install\nSuccess\n")
    return 0


def _pm_uninstall(ctx: Context, args: list[str]) -> int:
    names = [a for a in args if not a.startswith("-") and a != "0"]
    model = ctx.model
    if len(names) != 1:
        return ctx.error("Error: package name not specified", 1)
    name = names[0]
    package = model.packages.get(name)
    if package is None or package.system:
        ctx.out.write("Failure [DELETE_FAILED_INTERNAL_ERROR]\n")
        return 1
    if "cleanup_fail" in model.faults:
        ctx.out.write("Failure [DELETE_FAILED_INTERNAL_ERROR]\n")
        return 1
    app.clear_data(model, name)
    del model.packages[name]
    ctx.out.write("Success\n")
    return 0


def _pm_clear(ctx: Context, args: list[str]) -> int:
    names = [a for a in args if not a.startswith("-") and a != "0"]
    if len(names) != 1 or names[0] not in ctx.model.packages:
        ctx.out.write("Failed\n")
        return 1
    if "cleanup_fail" in ctx.model.faults:
        ctx.out.write("Failed\n")
        return 1
    app.clear_data(ctx.model, names[0])
    ctx.out.write("Success\n")
    return 0


_PM: dict[str, CommandFn] = {
    "list": _pm_list,
    "path": _pm_path,
    "install": _pm_install,
    "uninstall": _pm_uninstall,
    "clear": _pm_clear,
}


@command("am")
def _am(ctx: Context, args: list[str]) -> int:
    if (failed := _not_booted(ctx, "activity")) is not None:
        return failed
    sub = args[0] if args else ""
    if sub in ("start", "start-activity"):
        return _am_start(ctx, args[1:])
    if sub in ("force-stop", "kill") and len(args) > 1:
        if args[-1] in ctx.model.packages:
            app.force_stop(ctx.model, args[-1])
        return 0
    return ctx.error(f"Error: unknown am command '{sub}'", 1)


def _am_start(ctx: Context, args: list[str]) -> int:
    component = ""
    intent: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "-n" and i + 1 < len(args):
            component = args[i + 1]
            i += 2
        elif args[i] in ("-a", "-d", "-c", "-t", "--user") and i + 1 < len(args):
            intent.append(f"{args[i][1:]}={args[i + 1]}")
            i += 2
        else:
            i += 1
    if not component:
        ctx.out.write(f"Starting: Intent {{ {' '.join(intent)} }}\n")
        return 0
    ctx.out.write(f"Starting: Intent {{ cmp={component} }}\n")
    package, _, activity = component.partition("/")
    installed = ctx.model.packages.get(package)
    wanted = installed.activity if installed else ""
    full = package + wanted if wanted.startswith(".") else wanted
    if installed is None or activity not in (wanted, full):
        ctx.err.write("Error type 3\n")
        return ctx.error(f"Error: Activity class {{{component}}} does not exist.", 1)
    app.launch(ctx.model, package)
    return 0


@command("monkey")
def _monkey(ctx: Context, args: list[str]) -> int:
    if (failed := _not_booted(ctx, "activity")) is not None:
        return failed
    package = args[args.index("-p") + 1] if "-p" in args[:-1] else ""
    installed = ctx.model.packages.get(package)
    if installed is None or (installed.system and package != LAUNCHER_PACKAGE):
        ctx.out.write("** No activities found to run, monkey aborted.\n")
        return 252
    app.launch(ctx.model, package)
    ctx.out.write("  bash arg: -p\n  bash arg: " + package + "\nEvents injected: 1\n")
    return 0


# --- input ----------------------------------------------------------------------------

KEYCODES = {
    "HOME": 3,
    "BACK": 4,
    "CALL": 5,
    "ENDCALL": 6,
    "DPAD_UP": 19,
    "DPAD_DOWN": 20,
    "DPAD_LEFT": 21,
    "DPAD_RIGHT": 22,
    "VOLUME_UP": 24,
    "VOLUME_DOWN": 25,
    "POWER": 26,
    "CAMERA": 27,
    "TAB": 61,
    "SPACE": 62,
    "ENTER": 66,
    "DEL": 67,
    "MENU": 82,
    "SEARCH": 84,
    "VOLUME_MUTE": 164,
    "APP_SWITCH": 187,
    "SLEEP": 223,
    "WAKEUP": 224,
}


def _keycode(name: str) -> int | None:
    if name.isdigit():
        return int(name)
    return KEYCODES.get(name.upper().removeprefix("KEYCODE_"))


def _coordinates(values: list[str]) -> list[int] | None:
    try:
        return [round(float(value)) for value in values]
    except ValueError:
        return None


@command("input")
def _input(ctx: Context, args: list[str]) -> int:
    if (failed := _not_booted(ctx, "input")) is not None:
        return failed
    if args[:1] == ["-d"]:
        args = args[2:]  # display id: the phone has one display
    if args and args[0] in ("touchscreen", "keyboard", "mouse", "touchpad", "dpad"):
        args = args[1:]
    sub, rest = (args[0], args[1:]) if args else ("", [])
    model = ctx.model
    now = time.time()
    if sub == "tap":
        point = _coordinates(rest)
        if point is None or len(point) != 2:
            return ctx.error("Error: input tap takes X Y", 1)
        model.input_log.append(InputEvent(now, "tap", (point[0], point[1])))
        app.tap(model, point[0], point[1])
    elif sub in ("swipe", "draganddrop"):
        values = _coordinates(rest)
        if values is None or len(values) not in (4, 5):
            return ctx.error(f"Error: input {sub} takes X1 Y1 X2 Y2 [DURATION_MS]", 1)
        duration = values[4] if len(values) == 5 else 300
        model.input_log.append(InputEvent(now, "swipe", (*values[:4], duration)))
        app.swipe(model, *values[:4])
    elif sub == "text":
        if not rest:
            return ctx.error("Error: input text takes TEXT", 1)
        text = " ".join(rest).replace("%s", " ")
        model.input_log.append(InputEvent(now, "text", (text,)))
        app.type_text(model, text)
    elif sub in ("keyevent", "press"):
        names = [a for a in rest if a not in ("--longpress", "--doubletap")] or ["23"]
        codes = [_keycode(name) for name in names]
        if None in codes:
            return ctx.error(f"Error: unknown keycode in {' '.join(names)}", 1)
        for code in codes:
            assert code is not None
            model.input_log.append(InputEvent(now, "keyevent", (code,)))
            app.key(model, code)
    else:
        return ctx.error(
            "Usage: input [<source>] <command> [<arg>...]\n"
            "  tap <x> <y> | swipe <x1> <y1> <x2> <y2> [duration(ms)] | text <string> | "
            "keyevent <key code number or name> ...",
            1,
        )
    return 0


# --- simctl ---------------------------------------------------------------------------


@command("simctl")
def _simctl(ctx: Context, args: list[str]) -> int:
    """Inspection and fault injection for tests and demos (not on a real phone)."""
    model = ctx.model
    if args == ["state"]:
        ctx.out.write(json.dumps(model.to_json(), indent=2, sort_keys=True) + "\n")
        return 0
    if len(args) == 3 and args[:2] == ["fault", "set"]:
        if args[2] not in FAULTS:
            return ctx.error(
                f"simctl: unknown fault '{args[2]}' (known: {', '.join(sorted(FAULTS))})", 2
            )
        model.faults.add(args[2])
        return 0
    if len(args) == 3 and args[:2] == ["fault", "clear"]:
        if args[2] == "all":
            model.faults.clear()
        elif args[2] in FAULTS:
            model.faults.discard(args[2])
        else:
            return ctx.error(
                f"simctl: unknown fault '{args[2]}' (known: {', '.join(sorted(FAULTS))}, all)", 2
            )
        return 0
    if args == ["fault", "list"]:
        ctx.out.write("".join(f"{name}\n" for name in sorted(model.faults)))
        return 0
    return ctx.error(
        "usage: simctl state | simctl fault set NAME | simctl fault clear NAME|all | "
        "simctl fault list",
        2,
    )
