"""The site's lifetime DP ledger: every DP-SGD round this site ever trained, across runs
and resumes, in one file of its work directory that no run can reset. A round reserves
its target epsilon before it trains (under a file lock, written atomically with fsync),
and settles to what it spent after; a round that dies after reserving stays charged.
Epsilons compose by summation (basic composition: an upper bound, looser than RDP
accounting across rounds, and stated as such in `fedclif site ledger`)."""

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from fedclif.shared.protocol.federation import SiteRefusal

LEDGER_FILE = "dp-ledger.json"
FORMAT, VERSION = "fedclif-dp-ledger", 1


class Ledger:
    def __init__(self, work: Path):
        self.path = Path(work) / LEDGER_FILE

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def entries(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return json.loads(self.path.read_text())["entries"]

    def spent(self) -> float:
        """Epsilon spent (or reserved) over the site's lifetime, summed."""
        return _total(self.entries())

    def _write(self, entries: list[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, "version": VERSION, "entries": entries}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def reserve(
        self, run: int, stage: str, rnd: int, epsilon: float, delta: float, limit: float
    ) -> int:
        """Charge `epsilon` for one round before it trains; refused past `limit`. Returns
        the entry's index (for `settle`)."""
        with self._locked():
            entries = self.entries()
            spent = _total(entries)
            if spent + epsilon > limit + 1e-9:
                raise SiteRefusal(
                    "dp_budget_exhausted",
                    f"policy: dp.max_epsilon_lifetime: this round would pass {limit:.3g}",
                )
            entries.append(
                {
                    "run": run,
                    "stage": stage,
                    "round": rnd,
                    "epsilon": epsilon,
                    "delta": delta,
                    "status": "reserved",
                    "time": time.time(),
                }
            )
            self._write(entries)
            return len(entries) - 1

    def settle(self, index: int, epsilon: float) -> None:
        """The round trained: its entry holds what it spent (at most what it reserved)."""
        with self._locked():
            entries = self.entries()
            entries[index].update(epsilon=min(epsilon, entries[index]["epsilon"]), status="spent")
            self._write(entries)


def _total(entries: list[dict]) -> float:
    return sum(float(e["epsilon"]) for e in entries)
