"""A transient rich progress bar on stderr (stdout stays clean for the generated text)."""
from __future__ import annotations


class ProgressBar:
    def __init__(self, description: str, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           transient=True, console=Console(stderr=True))
        self._p.start()
        self._task = self._p.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        self._p.advance(self._task, n)

    def close(self) -> None:
        self._p.stop()
