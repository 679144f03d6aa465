"""Progress and tables for people, silence for machines.

Stages report through a `UI` object instead of printing, so the same stage runs under the CLI
(rich progress bars on stderr), under `--json` (bars on stderr, JSON alone on stdout) and in
tests and benchmarks (`SilentUI`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# advance(n) moves a task's bar by n; advance(n, label) also renames the task (e.g. which
# reconstruction unit runs now); advance(0, skip=k) takes k planned steps off the total (work
# that turned out not to be needed, e.g. a unit that stopped early).
Advance = Callable[..., None]


class UI:
    """Silent by default; `RichUI` draws."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        yield lambda n=1, label=None, skip=0: None

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
        pass


SilentUI = UI


class RichUI(UI):
    def __init__(self, json_mode: bool = False) -> None:
        self.err = Console(stderr=True)
        self.out = self.err if json_mode else Console()
        self._warned: set[str] = set()

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        if not self.err.is_terminal:  # a CI log or a file: bars would appear only when done
            with self._log_task(description, total) as advance:
                yield advance
            return
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=self.err, transient=False) as progress:
            tid = progress.add_task(description, total=total)
            planned = total

            def advance(n: int = 1, label: str | None = None, skip: int = 0) -> None:
                nonlocal planned
                if label is not None:
                    progress.update(tid, description=f"{description}: {label}")
                if skip and planned is not None:
                    planned = max(planned - skip, 0)
                    progress.update(tid, total=planned)
                progress.advance(tid, n)

            yield advance

    @contextlib.contextmanager
    def _log_task(self, description: str, total: int | None) -> Iterator[Advance]:
        """Plain lines instead of a bar: the start, each new label (a reconstruction unit),
        every tenth of the planned steps, and the end, each with the seconds so far."""
        start = time.monotonic()
        done, planned, mark, last = 0, total, 10, None

        def line(text: str) -> None:
            elapsed = time.monotonic() - start
            self.err.print(
                f"{escape(description)}: {escape(text)} [{elapsed:.0f} s]",
                soft_wrap=True,
                highlight=False,
            )

        line(f"started ({total} steps)" if total else "started")

        def advance(n: int = 1, label: str | None = None, skip: int = 0) -> None:
            nonlocal done, planned, mark, last
            if label is not None and label != last:
                last = label
                line(label)
            if skip and planned is not None:
                planned = max(planned - skip, 0)
            done += n
            if planned:
                pct = 100 * done // planned
                if pct >= mark and done < planned:
                    line(f"{done}/{planned} ({pct}%)")
                    mark = pct // 10 * 10 + 10

        yield advance
        line(f"done ({done}/{planned} steps)" if planned else "done")

    def info(self, message: str) -> None:
        self.err.print(message, soft_wrap=True, highlight=False)

    def warn(self, message: str) -> None:
        """Once per message: chained stages (quantize) load the same model several times."""
        if message in self._warned:
            return
        self._warned.add(message)
        self.err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True, highlight=False)

    def error(self, message: str) -> None:
        """One unwrapped line, so file names stay whole for people and for grep."""
        self.err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
        t = Table(title=title, title_justify="left")
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*(_cell(v) for v in r))
        self.out.print(t)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return str(v)
