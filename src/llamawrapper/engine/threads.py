"""Which thread runs torch with how many OpenMP threads.

One OpenMP team per process (the executor's): a second thread that runs torch work with a
team of its own (a model loading while another serves) makes libgomp throttle the executor's
workers. A loading thread therefore limits *itself* to one OpenMP thread: torch's own
``set_num_threads`` is process-wide (it would also slow the executor), so the per-thread
OpenMP setting is changed directly, after torch's lazy per-thread initialisation has run."""

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


def limit_current_thread(threads: int = 1) -> bool:
    """Make torch work on the calling thread use ``threads`` OpenMP threads, leaving every other
    thread's setting alone. Returns whether it could."""
    import torch

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
