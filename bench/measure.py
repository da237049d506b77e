"""Benchmark helpers: run a phase in a fresh process (its wall time and peak memory are
its own), and the tokenized demo site benches train on."""

import contextlib
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable
from pathlib import Path

from fedclif.shared.memory import peak_rss_mib


def _reset_peak() -> None:
    # A spawned child can inherit its parent's high-water mark; "5" resets it.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _child(fn: Callable, args: tuple, q) -> None:
    _reset_peak()
    t0 = time.perf_counter()
    n = fn(*args)
    q.put((time.perf_counter() - t0, peak_rss_mib(), n))


def measure(fn: Callable, *args) -> tuple[float, float, int]:
    """Seconds, peak RSS (MiB) and fn's count, in a fresh process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    while True:  # a child that dies without an answer must not hang the benchmark
        try:
            out = q.get(timeout=1.0)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"{fn.__name__} died (exit code {p.exitcode})") from None
    p.join()
    return out


def tokenized_demo(root: Path) -> Path:
    """`fedclif quickstart` into `root` (console output dropped); its tokenized site."""
    from fedclif.cli import main

    if not (root / "tokens" / "timelines.parquet").is_file():
        with (
            open(os.devnull, "w") as null,
            contextlib.redirect_stdout(null),
            contextlib.redirect_stderr(null),
        ):
            assert main(["quickstart", "--out", str(root)]) == 0
    return root / "tokens"
