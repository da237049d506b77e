"""This process's peak memory, for the per-round records and the benchmarks."""

import resource
from pathlib import Path


def peak_rss_mib() -> float:
    """Peak RSS of this process (Linux VmHWM: since exec, or since a reset through
    /proc/self/clear_refs), else getrusage's peak, which execve keeps from the parent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
