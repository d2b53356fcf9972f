"""Stage progress: one live display on a terminal (a spinner or a bar per stage, a tick and its time once done),
plain `[bankllm]` lines otherwise (tests and logs read those); and the summary a job ends with."""

from __future__ import annotations

import contextlib
import resource
import time

from .. import console


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


_live = 0  # live displays open: rich draws one per console, so a nested stage falls back to lines


def _bar(stream, *, total: int | None, transient: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}")]
    if total:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns += [TimeElapsedColumn(), TextColumn("[dim]{task.fields[note]}")]
    # No redirect: rich would route sys.stdout/sys.stderr writes (library output) onto the terminal above the bar.
    return RichProgress(*columns, console=console.rich_console(stream), transient=transient,
                        redirect_stdout=False, redirect_stderr=False)


class Progress:
    def __init__(self, quiet: bool = False, stream=None):
        self._stream = stream  # None: bankllm's stderr at each call (the real one while libraries are captured)
        self.quiet = quiet
        self._task = None

    @property
    def stream(self):
        return self._stream or console.err_stream()

    @property
    def tty(self) -> bool:
        return self.stream.isatty()

    def info(self, message: str) -> None:
        if not self.quiet:
            console.line(message, stream=self.stream)

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None):
        """Time a stage; yields a dict the stage may fill; adds seconds and peak memory to it."""
        global _live
        record: dict = {"name": name}
        start = time.perf_counter()
        console.mark_busy()
        if self.tty and not self.quiet and _live == 0:
            bar = _bar(self.stream, total=total, transient=True)
            self._task = (bar, bar.add_task(name, total=total, note=""))
            _live += 1
            try:
                with bar:
                    yield record
            finally:
                _live -= 1
                self._task = None
        else:
            self.info(f"[bankllm] {name} ...")
            yield record
        record["seconds"] = round(time.perf_counter() - start, 2)
        record["peak_rss_mb"] = round(peak_rss_mb(), 1)
        detail = record.get("detail", "")
        if not self.quiet:
            from rich.text import Text

            console.line(f"[bankllm] {name} done in {record['seconds']:.1f}s {detail}".rstrip(), stream=self.stream,
                         styled=Text.assemble(("✓ ", "green"), (name, "bold"), (f"  {record['seconds']:.1f}s", "dim"),
                                              f"  {detail}" if detail else ""))

    def advance(self, n: int = 1, note: str | None = None) -> None:
        """Move the running stage's bar (a no-op off a terminal)."""
        if self._task is not None:
            bar, task = self._task
            bar.update(task, advance=n, **({"note": note} if note is not None else {}))

    def summary(self, title: str, rows: list[tuple[str, str]]) -> None:
        """What a job made, in a few lines: `title`, then one `key: value` row each."""
        if self.quiet:
            return
        from rich.table import Table
        from rich.text import Text

        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim")
        grid.add_column()
        for key, value in rows:
            grid.add_row(key, Text(value))
        if self.tty:
            console.rich_console(self.stream).print(Text(title, style="bold green"), grid)
            for text in [title, *(f"  {k}: {v}" for k, v in rows)]:
                console.to_log(console.PREFIX + text)
        else:
            for text in [title, *(f"  {k}: {v}" for k, v in rows)]:
                console.line(console.PREFIX + text, stream=self.stream)


class StepBar:
    """A tqdm-like bar (update, set_postfix, close) drawn by rich on bankllm's terminal: the training steps."""

    def __init__(self, total: int, initial: int = 0, unit: str = "step", description: str = "train"):
        global _live
        self._bar = _bar(console.err_stream(), total=total, transient=False)
        self._task = self._bar.add_task(f"{description} ({unit}s)", total=total, completed=initial, note="")
        self._bar.start()
        _live += 1
        console.mark_busy()

    def update(self, n: int = 1) -> None:
        self._bar.update(self._task, advance=n)

    def set_postfix(self, **fields) -> None:
        self._bar.update(self._task, note=" ".join(f"{k} {v}" for k, v in fields.items()))

    def close(self) -> None:
        global _live
        if self._bar.live.is_started:
            self._bar.stop()
            _live -= 1


def build_summary(report: dict, out_dir) -> tuple[str, list[tuple[str, str]]]:
    """The closing lines of a build: what was built, the gate's figures, where the files are."""
    chosen, gate = report["chosen"], report["gate"]
    tried = ", ".join(f"{c['model']} {c['verdict']}" for c in gate["candidates"])
    size = f"{chosen['size_bytes'] / 2**20:.1f} MiB"
    files = ["model.gguf", "Modelfile", "build-report.json"] + ([report["labels"]["file"]] if report.get("labels") else [])
    rows = [("model", f"{chosen['model']}, {size} (tried: {tried})"),
            ("gate", f"ppl {chosen['ppl']:.3f} vs {gate['f16']['ppl']:.3f} in f16 ({chosen['ppl_increase']:+.2%}), "
                     f"KLD {chosen['mean_kld']:.4f}, top-1 agreement {chosen['top1_agreement']:.1%} "
                     f"over {gate['tokens_scored']} tokens"),
            ("files", f"{out_dir}: {', '.join(files)}")]
    rows += [("warning", w) for w in report.get("warnings", [])]
    return f"build {report['build_id']}: {chosen['model']}, gate verdict {report['verdict']}", rows
