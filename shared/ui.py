"""Console output shared by every command: results on stdout, progress on stderr."""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

console = Console(stderr=True)
out = Console()


def progress() -> Progress:
    """The progress bar every long command shows (removed when done)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def setup_logging(debug: bool = False) -> None:
    """fedclif's log lines (loggers under `fedclif`) on stderr through rich: the command
    line and the Flower app processes alike (their output is the run's log)."""
    log = logging.getLogger("fedclif")
    log.handlers[:] = [RichHandler(console=console, show_path=False, show_time=False)]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


@contextmanager
def step(name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    with console.status(f"{name}…"):
        yield
    console.print(f"[green]✓[/] {name} [dim]({time.perf_counter() - t0:.1f} s)[/]")
