"""Synthetic site generation speed and memory at growing size.

Each size runs in a fresh process (peak RSS is its own); stays/second is the median over
--repeats runs. Memory should stay flat in N: generation is written chunk by chunk.

    python -m bench.synth                         # 10,000 and 100,000 stays
    python -m bench.synth --sizes 2000 --repeats 1   # quick check
"""

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.measure import measure


def _generate(stays: int, out: Path) -> int:
    from fedclif.simulations.synth import load_preset, write_site

    return sum(write_site(load_preset("mimic-like"), stays, 0, out).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'stays':>9} {'seconds':>8} {'stays/s':>9} {'rows/s':>11} {'peak MiB':>9}")
    for n in args.sizes:
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(measure(_generate, n, Path(tmp) / "site"))
        sec = statistics.median(r[0] for r in runs)
        rows = runs[0][2]
        print(
            f"{n:9,} {sec:8.2f} {n / sec:9,.0f} {rows / sec:11,.0f} {max(r[1] for r in runs):9.0f}"
        )


if __name__ == "__main__":
    main()
