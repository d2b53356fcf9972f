"""Stage progress: a spinner with timings on a terminal, plain lines otherwise."""

from __future__ import annotations

import contextlib
import resource
import sys
import time


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


class Progress:
    def __init__(self, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()

    def info(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a stage; yields a dict the stage may fill; adds seconds and peak memory to it."""
        record: dict = {"name": name}
        start = time.perf_counter()
        if self.tty and not self.quiet:
            from rich.console import Console

            with Console(file=self.stream).status(f"[bold]{name}[/bold] ..."):
                yield record
        else:
            self.info(f"[bankllm] {name} ...")
            yield record
        record["seconds"] = round(time.perf_counter() - start, 2)
        record["peak_rss_mb"] = round(peak_rss_mb(), 1)
        detail = record.get("detail", "")
        self.info(f"[bankllm] {name} done in {record['seconds']:.1f}s {detail}".rstrip())
