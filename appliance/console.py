"""bankllm's own voice on the terminal; what imported libraries print goes to a log file.

Inside `captured(log)` file descriptors 1 and 2 point at the log, so whatever a library writes lands there,
however it writes it: Python warnings, transformers/torch/peft logging, tqdm bars, torch/torchao load messages,
libllama/ggml's C-level lines (llama-cpp-python's log callback prints to sys.stderr, i.e. fd 2), and the output
of child processes (the converter, pip, systemctl). bankllm speaks through `line`, `click.echo` and the stage
display, which write to the streams saved at entry and copy each line into the log, so the log reads as a
transcript. With BANKLLM_DEBUG=1 the captured output is also copied live to the terminal.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import functools
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

PREFIX = "[bankllm] "
KEEP_LOGS = 20  # per data dir; one log per run of a job


@dataclass
class _Capture:
    log: Path
    log_fd: int
    saved: dict[int, int]  # fds 1 and 2 as they were: the terminal, or the caller's pipes
    out: TextIO            # bankllm's stdout and stderr: streams on copies of the saved fds
    err: TextIO
    tee: threading.Thread | None = None
    busy: bool = False     # a stage ran: a failure then points at the log
    undo: list = field(default_factory=list)


_active: _Capture | None = None
_consoles: dict[int, object] = {}


def debug() -> bool:
    from .settings import env_flag

    return (env_flag("DEBUG") or "").lower() in ("1", "true", "yes")


def err_stream() -> TextIO:
    """Where bankllm's own progress and messages go: the real stderr, also during a capture."""
    return _active.err if _active else sys.stderr


def out_stream() -> TextIO:
    return _active.out if _active else sys.stdout


def is_terminal() -> bool:
    return err_stream().isatty()


def log_path() -> Path | None:
    return _active.log if _active else None


def mark_busy() -> None:
    if _active:
        _active.busy = True


def rich_console(stream: TextIO | None = None):
    """One rich Console per stream, so lines printed during a live display land above it."""
    from rich.console import Console

    stream = stream or err_stream()
    if id(stream) not in _consoles:
        width = None
        with contextlib.suppress(OSError, ValueError):  # rich asks fds 0-2, which a capture has pointed at the log
            width = os.get_terminal_size(stream.fileno()).columns
        _consoles[id(stream)] = Console(file=stream, highlight=False, width=width)
    return _consoles[id(stream)]


def line(message: str, err: bool = True, stream: TextIO | None = None, styled=None) -> None:
    """Print one of bankllm's own lines (`styled`, a rich renderable, on a terminal) and copy it into the log."""
    stream = stream or (err_stream() if err else out_stream())
    if stream.isatty() and (err or styled is not None):
        rich_console(stream).print(styled if styled is not None else message.removeprefix(PREFIX),
                                   markup=False, soft_wrap=True)
    else:
        stream.write(message + "\n")
        stream.flush()
    to_log(message)


def to_log(text: str) -> None:
    if _active:
        os.write(_active.log_fd, (text + "\n").encode("utf-8", "backslashreplace"))


@contextlib.contextmanager
def captured(log: Path, show: bool | None = None):
    """Send fds 1 and 2 (and so every library's output) to `log`; `show` (default BANKLLM_DEBUG) also tees it."""
    global _active
    if _active is not None:  # a job inside a job: the outer capture already owns the fds
        yield _active
        return
    show = debug() if show is None else show
    log.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    _flush_all()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    out = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding=sys.stdout.encoding or "utf-8", errors="replace")
    err = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8", errors="replace")
    cap = _Capture(log, log_fd, saved, out, err)
    if show:
        read, write = os.pipe()
        cap.tee = threading.Thread(target=_tee, args=(read, log_fd, saved[2]), daemon=True)
        cap.tee.start()
        target = write
    else:
        target = log_fd
    for fd in (1, 2):
        os.dup2(target, fd)
    if show:
        os.close(write)
    _active = cap
    _route_logging(cap)
    _route_click(cap)
    to_log(f"# bankllm {' '.join(sys.argv[1:])}  ({dt.datetime.now().astimezone().isoformat(timespec='seconds')})")
    try:
        yield cap
    finally:
        release()


def release() -> None:
    """End the capture now (idempotent): put fds 1 and 2 back, e.g. before exec'ing the service in the foreground."""
    global _active
    cap, _active = _active, None
    if cap is None:
        return
    for undo in reversed(cap.undo):
        undo()
    _flush_all()
    for fd in (1, 2):
        os.dup2(cap.saved[fd], fd)
    if cap.tee is not None:  # before closing the saved fds: the tee writes its last chunks to the saved stderr
        cap.tee.join(timeout=30)  # EOF once fds 1 and 2 let go of the pipe (a child still holding it: give up)
    for fd in (1, 2):
        os.close(cap.saved[fd])
    for stream in (cap.out, cap.err):
        _consoles.pop(id(stream), None)
        stream.close()
    os.close(cap.log_fd)


def job(name: str):
    """Wrap a command's callback: library output to <data dir>/logs/<name>-<time>.log, a closing line with the time."""
    def wrap(callback):
        @functools.wraps(callback)
        def run(*args, **kwargs):
            if _active is not None:
                return callback(*args, **kwargs)
            log = _new_log(name, kwargs.get("config"))
            start = time.perf_counter()
            with captured(log) as cap:
                try:
                    result = callback(*args, **kwargs)
                except BaseException:
                    if cap.busy:  # quiet when an input check failed before any work: the error line says it all
                        line(f"{PREFIX}{name} stopped after {_took(start)}; library output is in {log}")
                    raise
                line(f"{PREFIX}{name} finished in {_took(start)}; library output is in {log}")
            return result
        return run
    return wrap


def _new_log(name: str, config) -> Path:
    from .settings import Settings, default_data_dir

    try:
        data_dir = Path(Settings.load(config=config).data_dir)
    except Exception:  # the command reports a bad config itself, as one line
        data_dir = default_data_dir()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for folder in (data_dir / "logs", Path(os.environ.get("TMPDIR", "/tmp")) / "bankllm-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            old = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)
            for stale in old[:max(0, len(old) - KEEP_LOGS + 1)]:
                stale.unlink(missing_ok=True)
            return folder / f"{name}-{stamp}-{os.getpid()}.log"
        except OSError:
            continue
    return Path(os.devnull)


def _took(start: float) -> str:
    s = time.perf_counter() - start
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m {s % 60:04.1f}s"


def _tee(read: int, log_fd: int, terminal: int) -> None:
    while chunk := os.read(read, 65536):
        os.write(log_fd, chunk)
        os.write(terminal, chunk)
    os.close(read)


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # C stdio buffers (printf from a C library) too
        ctypes.CDLL(None).fflush(None)


class _LineHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            line(self.format(record))


def _route_logging(cap: _Capture) -> None:
    """bankllm's loggers speak on the terminal; every other logger's records go to the log (through fd 2)."""
    ours, root = logging.getLogger("bankllm"), logging.getLogger()
    handler, to_file = _LineHandler(), logging.StreamHandler(sys.stderr)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    state = (ours.level, ours.propagate)
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    root.addHandler(to_file)  # also makes a command's logging.basicConfig a no-op

    def undo():
        ours.removeHandler(handler)
        ours.level, ours.propagate = state
        root.removeHandler(to_file)
    cap.undo.append(undo)


def _route_click(cap: _Capture) -> None:
    """click.echo with no file is a command talking to the operator: route it to the saved streams."""
    import click

    original = click.echo

    def echo(message=None, file=None, nl=True, err=False, color=None):
        if file is not None or _active is None:
            return original(message, file=file, nl=nl, err=err, color=color)
        text = message.decode("utf-8", "replace") if isinstance(message, (bytes, bytearray)) else \
            "" if message is None else str(message)
        if nl:
            line(text, err=err)
        else:
            (err_stream() if err else out_stream()).write(text)

    click.echo = echo
    cap.undo.append(lambda: setattr(click, "echo", original))
