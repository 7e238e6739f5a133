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


def own_cpu_seconds() -> float:
    """User plus system CPU of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU of ``pid``, its live descendants and its reaped children: the whole PostgreSQL
    server (backends that exited are in the postmaster's children times) or the AI server."""
    import psutil

    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in root.children(recursive=True):
            try:
                t = child.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                continue  # reaped meanwhile: now in the parent's children times
    except psutil.NoSuchProcess:
        return None
    return float(total)
