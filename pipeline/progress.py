"""Progress for long loops: a rich bar on a terminal, a log line every ~5 % elsewhere (CI logs)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def step_progress(description: str, total: int, start: int = 0
                  ) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(status)``; call it once per finished step with a short status text."""
    if sys.stderr.isatty():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(description, total=total, completed=start, status="")
            yield lambda status: bar.update(task, advance=1, status=status)
        return
    every = max(1, total // 20)
    done = [start]
    t0 = time.perf_counter()

    def advance(status: str) -> None:
        done[0] += 1
        if done[0] % every == 0 or done[0] == total:
            rate = (time.perf_counter() - t0) / max(1, done[0] - start)
            log.info("%s: %d/%d %s (eta %.0fs)", description, done[0], total, status,
                     rate * (total - done[0]))

    yield advance
