"""One install at a time: an fcntl lock on a file in the appliance's state directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ..errors import LockedError


@contextlib.contextmanager
def install_lock(path: Path):
    """Hold an exclusive, non-blocking flock on `path`; another holder gets LockedError at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockedError(f"another bankllm install/uninstall is running (pid {holder}, lock {path})",
                              "wait for it to finish; the lock frees itself when that process exits") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        # Closing the descriptor releases the lock, also when the process is killed.
        os.close(fd)
