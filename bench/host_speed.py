"""How fast this machine's CPU is at a moment: the CPU time of a fixed loop.

On the shared 2-core VMs the bench runs on, that time is not a constant. On an idle machine the
same loop's CPU time moved from 0.142 to 0.239 s within 30 seconds (bench/RESULTS.md, "The
machine's own speed"). A ratio of two measurements taken a minute apart then carries that
factor, so the bench probes before and after every measurement and prints both beside it.
"""

from __future__ import annotations

import time

#: Iterations of the probe's loop: about 10-20 ms of CPU on the bench's hosts.
PROBE_LOOPS = 150_000
#: The probe is the best of this many runs of the loop (a preempted run is not the speed).
PROBE_RUNS = 3


def probe_ms() -> float:
    """CPU milliseconds of the fixed loop, the best of :data:`PROBE_RUNS`: lower is faster."""
    best = float("inf")
    for _ in range(PROBE_RUNS):
        began = time.process_time()
        x = 0
        for i in range(PROBE_LOOPS):
            x += i * i % 7
        best = min(best, time.process_time() - began)
    return best * 1e3
