"""A small POSIX-like shell: enough of /system/bin/sh for what adb clients send.

Supports quoting ('...', "...", backslash), ``$?``/``$NAME``/``${NAME}``,
``;`` ``&&`` ``||`` ``|`` (and ``&``, run in order), redirections ``>``, ``>>``,
``2>``, ``2>&1``, ``<``, ``NAME=value`` assignments and globs (``*``, ``?``) in
the last path segment. adbutils' ``shell2`` appends ``; echo X4EXIT:$?`` to read
the exit status over the v1 protocol, which this handles.

The commands themselves are in ``stepline.phone.commands``.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field

from stepline.phone.model import PhoneModel, normpath

SH = "/system/bin/sh"


class ShellSyntaxError(Exception):
    pass


class ShellExit(Exception):
    """``exit N``: stop the script with status N."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# --- tokens ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Var:
    name: str


@dataclass
class Word:
    parts: list[str | Var] = field(default_factory=list)
    quoted: bool = False
    glob: bool = False

    def literal(self) -> str | None:
        """The word's text when it is plain literal text (no variables)."""
        if all(isinstance(part, str) for part in self.parts):
            return "".join(part for part in self.parts if isinstance(part, str))
        return None


@dataclass(frozen=True)
class Op:
    op: str


Token = Word | Op


def _read_var(script: str, i: int) -> tuple[Var | str, int]:
    """Parse after a ``$`` at ``script[i-1]``; returns (Var or literal, next index)."""
    if i < len(script) and script[i] in "?$#!0":
        return Var(script[i]), i + 1
    if i < len(script) and script[i] == "{":
        end = script.find("}", i)
        if end < 0:
            raise ShellSyntaxError("bad substitution")
        return Var(script[i + 1 : end]), end + 1
    j = i
    while j < len(script) and (script[j].isalnum() or script[j] == "_"):
        j += 1
    if j == i:
        return "$", i
    return Var(script[i:j]), j


def tokenize(script: str) -> list[Token]:
    tokens: list[Token] = []
    word: Word | None = None
    i, n = 0, len(script)

    def current() -> Word:
        nonlocal word
        if word is None:
            word = Word()
        return word

    def add(text: str | Var) -> None:
        w = current()
        if isinstance(text, str) and w.parts and isinstance(w.parts[-1], str):
            w.parts[-1] += text
        else:
            w.parts.append(text)

    def flush() -> None:
        nonlocal word
        if word is not None:
            tokens.append(word)
            word = None

    while i < n:
        c = script[i]
        if c in " \t":
            flush()
            i += 1
        elif c in ";\n":
            flush()
            tokens.append(Op(";"))
            i += 1
        elif c in "&|":
            flush()
            if script.startswith(c * 2, i):
                tokens.append(Op(c * 2))
                i += 2
            else:
                tokens.append(Op(";" if c == "&" else "|"))
                i += 1
        elif c in "<>":
            fd = ""
            if word is not None and not word.quoted and (word.literal() or "").isdigit():
                fd = word.literal() or ""
                word = None
            flush()
            op = c
            i += 1
            if c == ">" and i < n and script[i] == ">":
                op, i = ">>", i + 1
            if i < n and script[i] == "&":
                op, i = op + "&", i + 1
            tokens.append(Op(fd + op))
        elif c == "#" and word is None:
            while i < n and script[i] != "\n":
                i += 1
        elif c == "'":
            end = script.find("'", i + 1)
            if end < 0:
                raise ShellSyntaxError("unterminated quoted string")
            current().quoted = True
            add(script[i + 1 : end])
            i = end + 1
        elif c == '"':
            current().quoted = True
            i += 1
            while True:
                if i >= n:
                    raise ShellSyntaxError("unterminated quoted string")
                ch = script[i]
                if ch == '"':
                    i += 1
                    break
                if ch == "\\" and i + 1 < n and script[i + 1] in '$`"\\\n':
                    add(script[i + 1])
                    i += 2
                elif ch == "$":
                    part, i = _read_var(script, i + 1)
                    add(part)
                else:
                    add(ch)
                    i += 1
        elif c == "\\":
            current().quoted = True
            if i + 1 < n:
                add(script[i + 1])
            i += 2
        elif c == "$":
            part, i = _read_var(script, i + 1)
            add(part)
        else:
            if c in "*?[":
                current().glob = True
            add(c)
            i += 1
    flush()
    return tokens


# --- parse ----------------------------------------------------------------------------


@dataclass
class Redirect:
    op: str  # ">", ">>", "2>", "2>>", ">&" forms, "<"
    target: Word


@dataclass
class Command:
    words: list[Word] = field(default_factory=list)
    redirects: list[Redirect] = field(default_factory=list)


Pipeline = list[Command]


def parse(script: str) -> list[tuple[str, Pipeline]]:
    """``[(connector, pipeline), ...]``; connector is ``;``, ``&&`` or ``||``."""
    tokens = tokenize(script)
    result: list[tuple[str, Pipeline]] = []
    connector = ";"
    pipeline: Pipeline = []
    command = Command()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if isinstance(token, Word):
            command.words.append(token)
        elif token.op in (";", "&&", "||", "|"):
            if command.words or command.redirects:
                pipeline.append(command)
            elif token.op != ";" or pipeline:
                raise ShellSyntaxError(f"syntax error: unexpected '{token.op}'")
            command = Command()
            if token.op != "|":
                if pipeline:
                    result.append((connector, pipeline))
                pipeline, connector = [], token.op
        else:
            if i + 1 >= len(tokens) or not isinstance(tokens[i + 1], Word):
                raise ShellSyntaxError("syntax error: unexpected newline")
            target = tokens[i + 1]
            assert isinstance(target, Word)
            command.redirects.append(Redirect(token.op, target))
            i += 1
        i += 1
    if command.words or command.redirects:
        pipeline.append(command)
    elif pipeline or connector in ("&&", "||"):
        raise ShellSyntaxError("syntax error: unexpected end of file")
    if pipeline:
        result.append((connector, pipeline))
    return result


# --- run ------------------------------------------------------------------------------


class Output:
    """Where a command's stdout or stderr goes."""

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink

    def write(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        if data:
            self._sink(data)


@dataclass
class Context:
    """What a command sees: the phone, its arguments' environment and its streams."""

    model: PhoneModel
    shell: Shell
    stdin: bytes
    out: Output
    err: Output

    def error(self, message: str, status: int = 1) -> int:
        self.err.write(message if message.endswith("\n") else message + "\n")
        return status


CommandFn = Callable[[Context, list[str]], int]


@dataclass
class Result:
    stdout: bytes
    stderr: bytes
    chunks: list[tuple[int, bytes]]  # (1 stdout | 2 stderr, data) in the order written
    status: int

    @property
    def output(self) -> bytes:
        """stdout and stderr interleaved, as a terminal (or the v1 protocol) shows them."""
        return b"".join(data for _fd, data in self.chunks)


class Shell:
    """Runs scripts against a model. Call with ``model.lock`` held."""

    def __init__(self, model: PhoneModel, commands: dict[str, CommandFn]) -> None:
        self.model = model
        self.commands = commands
        self.status = 0
        self.variables: dict[str, str] = {
            "HOME": "/",
            "PATH": "/product/bin:/apex/com.android.runtime/bin:/system/bin:/system/xbin",
            "EXTERNAL_STORAGE": "/sdcard",
            "ANDROID_DATA": "/data",
            "USER": "shell",
            "$": "4242",
            "#": "0",
            "0": SH,
            "!": "",
        }

    def run(self, script: str, stdin: bytes = b"") -> Result:
        chunks: list[tuple[int, bytes]] = []
        out = Output(lambda data: chunks.append((1, data)))
        err = Output(lambda data: chunks.append((2, data)))
        try:
            lists = parse(script)
        except ShellSyntaxError as exc:
            err.write(f"{SH}: {exc}\n")
            self.status = 2
            lists = []
        try:
            for connector, pipeline in lists:
                if connector == "&&" and self.status != 0:
                    continue
                if connector == "||" and self.status == 0:
                    continue
                self.status = self._pipeline(pipeline, stdin, out, err)
        except ShellExit as exc:
            self.status = exc.status & 0xFF
        return Result(
            stdout=b"".join(d for fd, d in chunks if fd == 1),
            stderr=b"".join(d for fd, d in chunks if fd == 2),
            chunks=chunks,
            status=self.status,
        )

    def expand(self, word: Word) -> list[str]:
        text = "".join(
            part if isinstance(part, str) else self._variable(part.name) for part in word.parts
        )
        if word.glob:
            matches = self._glob(text)
            if matches:
                return matches
        if not text and not word.quoted and any(isinstance(p, Var) for p in word.parts):
            return []  # an unquoted empty expansion disappears
        return [text]

    def _variable(self, name: str) -> str:
        if name == "?":
            return str(self.status)
        return self.variables.get(name, "")

    def _glob(self, pattern: str) -> list[str]:
        directory, base = posixpath.split(pattern)
        if any(ch in directory for ch in "*?["):
            return []
        where = normpath(directory or ".")
        if not self.model.is_dir(where):
            return []
        names = [name for name in self.model.list_dir(where) if fnmatch.fnmatchcase(name, base)]
        if not base.startswith("."):
            names = [name for name in names if not name.startswith(".")]
        return [posixpath.join(directory, name) if directory else name for name in names]

    def _pipeline(self, pipeline: Pipeline, stdin: bytes, out: Output, err: Output) -> int:
        status = 0
        data = stdin
        for index, command in enumerate(pipeline):
            last = index == len(pipeline) - 1
            if last:
                status = self._command(command, data, out, err)
            else:
                buffer = bytearray()
                status = self._command(command, data, Output(buffer.extend), err)
                data = bytes(buffer)
        return status

    def _command(self, command: Command, stdin: bytes, out: Output, err: Output) -> int:
        args: list[str] = []
        for word in command.words:
            args.extend(self.expand(word))
        assignments: dict[str, str] = {}
        while args and "=" in args[0] and args[0].split("=", 1)[0].isidentifier():
            name, value = args.pop(0).split("=", 1)
            assignments[name] = value
        if not args:
            self.variables.update(assignments)
        pending: list[tuple[str, bytearray, bool]] = []
        for redirect in command.redirects:
            targets = self.expand(redirect.target)
            target = targets[0] if targets else ""
            op = redirect.op
            if op == "<":
                path = normpath(target)
                if path == "/dev/null":
                    stdin = b""
                elif path not in self.model.files:
                    err.write(f"{SH}: can't open '{target}': No such file or directory\n")
                    return 1
                else:
                    stdin = self.model.files[path]
            elif op.endswith("&"):
                if target == "1" and op.startswith("2"):
                    err = out
                elif target == "2":
                    out = err
            else:
                fd = 2 if op.startswith("2") else 1
                append = op.endswith(">>")
                if target == "/dev/null":
                    sink = Output(lambda _data: None)
                else:
                    path = normpath(target)
                    problem = self._cannot_create(path)
                    if problem:
                        err.write(f"{SH}: can't create {target}: {problem}\n")
                        return 1
                    buffer = bytearray()
                    pending.append((path, buffer, append))
                    sink = Output(buffer.extend)
                if fd == 1:
                    out = sink
                else:
                    err = sink
        status = 0
        if args:
            status = self._invoke(args, stdin, out, err)
        for path, buffer, append in pending:
            data = self.model.files.get(path, b"") + bytes(buffer) if append else bytes(buffer)
            try:
                self.model.write_file(path, data)
            except OSError as exc:
                err.write(f"{SH}: write error: {exc}\n")
                status = 1
        return status

    def _cannot_create(self, path: str) -> str:
        if self.model.is_dir(path):
            return "Is a directory"
        if not self.model.is_dir(posixpath.dirname(path)):
            return "No such file or directory"
        if not writable(path):
            return "Permission denied"
        return ""

    def _invoke(self, args: list[str], stdin: bytes, out: Output, err: Output) -> int:
        name = args[0].rsplit("/", 1)[-1] if args[0].startswith("/system/bin/") else args[0]
        function = self.commands.get(name)
        if function is None:
            err.write(f"{SH}: {args[0]}: not found\n")
            return 127
        context = Context(self.model, self, stdin, out, err)
        return function(context, args[1:])


WRITABLE_ROOTS = ("/sdcard", "/storage", "/data/local/tmp")


def writable(path: str) -> bool:
    """Whether the shell user may create or remove ``path`` (as on a real phone)."""
    path = normpath(path)
    return any(path == root or path.startswith(root + "/") for root in WRITABLE_ROOTS)
