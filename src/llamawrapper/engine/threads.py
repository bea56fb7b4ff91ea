"""Which thread runs torch with how many OpenMP threads, at which priority.

One OpenMP team per process (the executor's): a second thread that runs torch work with a
team of its own (a model loading while another serves) makes libgomp throttle the executor's
workers. A loading thread therefore limits *itself* to one OpenMP thread: torch's own
``set_num_threads`` is process-wide (it would also slow the executor), so the per-thread
OpenMP setting is changed directly, after torch's lazy per-thread initialisation has run.
It also lowers its own scheduling priority (Linux nice is per thread): measured, a load beside
a serving model cut that model's decoding to 0.11-0.33x while it ran, and to ~0.6x at nice 15;
the load takes longer instead (docs/HOST.md)."""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Optional

log = logging.getLogger("llamawrapper.engine")


@functools.lru_cache(maxsize=1)
def _libgomp() -> Optional[ctypes.CDLL]:
    """The OpenMP runtime torch loaded (the wheel ships its own, renamed ``libgomp-*.so``)."""
    import torch  # noqa: F401  (loads the runtime)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def limit_current_thread(threads: int = 1, nice: int = 15) -> bool:
    """Make torch work on the calling thread use ``threads`` OpenMP threads, leaving every other
    thread's setting alone, and lower the thread's priority by ``nice``. Returns whether the
    thread count could be set."""
    import os
    import threading

    import torch

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError):  # not Linux, or not allowed: the load just competes evenly
        pass
    torch.get_num_threads()  # runs torch's per-thread init now, so it cannot undo the limit later
    lib = _libgomp()
    if lib is None:
        log.debug("no OpenMP runtime found; loading thread not limited")
        return False
    lib.omp_set_num_threads(threads)
    return torch.get_num_threads() == threads


def set_process_threads(threads: int) -> None:
    """Torch threads for the executor (every model in the process), set on its own thread."""
    import torch

    from .executor import get_executor

    get_executor().call(lambda: torch.set_num_threads(threads)).result()
