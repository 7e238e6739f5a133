"""Memory figures of a process, read from ``/proc`` (Linux) with ``resource`` as the fallback."""

from __future__ import annotations

import resource
from pathlib import Path

MIB = 1024 * 1024


def _status_kib(pid: int | str, field: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def rss_mib(pid: int | str = "self") -> float | None:
    """Current resident set size."""
    kib = _status_kib(pid, "VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """Peak resident set size over the process's life (``VmHWM``, the kernel's high-water mark)."""
    kib = _status_kib(pid, "VmHWM")
    if kib is None and pid == "self":
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return None if kib is None else kib / 1024


def children_peak_rss_mib() -> float:
    """Largest peak RSS of any waited-for descendant (``RUSAGE_CHILDREN`` is a max, not a sum)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
