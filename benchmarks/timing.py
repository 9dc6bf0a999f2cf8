"""Wall-clock timing and process memory helpers, free of JAX and PyTorch imports."""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np


def median_time(call: Callable[[], object], *, budget_s: float, min_runs: int, max_runs: int,
                slow_call_s: float, single_run_s: float):
    """Median wall time of ``call`` (which must block on its result) and the run count.

    One warm-up call first (first-call costs excluded), then timed runs until
    ``min_runs`` are done and ``budget_s`` is spent, or ``max_runs``. Calls whose
    warm-up took over ``slow_call_s`` get a single timed run; over
    ``single_run_s`` the warm-up itself is reported (``runs = 0``: a cold run,
    whose first-call costs are negligible at that length).
    """
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    if first > single_run_s:
        return first, 0
    if first > slow_call_s:
        min_runs = max_runs = 1
    times = []
    while True:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        if len(times) >= max_runs or (len(times) >= min_runs and sum(times) >= budget_s):
            break
    return float(np.median(times)), len(times)


def max_rss_bytes() -> Optional[int]:
    """This process's peak resident memory so far (Linux reports KiB)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
