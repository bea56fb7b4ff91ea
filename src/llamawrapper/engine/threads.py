"""Which thread runs torch with how many OpenMP threads, at which priority.

One OpenMP team per process (the executor's): a second thread that runs torch work with a
team of its own (a model loading while another serves) makes libgomp throttle the executor's
workers. A loading thread therefore limits *itself* to one OpenMP thread: torch's own
``set_num_threads`` is process-wide (it would also slow the executor), so the per-thread
OpenMP setting is changed directly, after torch's lazy per-thread initialisation has run.
It also lowers its own scheduling priority (Linux nice is per thread): measured, a load beside
a serving model cut that model's decoding to 0.11-0.33x while it ran, and to ~0.6x at nice 15;
the load takes longer instead (docs/HOST.md).

The executor's team is pinned one thread per CPU when it has as many threads as the process may
use CPUs (``pin_team``): unpinned, the scheduler stacked both of a 2-core machine's threads on one
core or moved them while a client on the same machine ran, and every parallel region waited for
the slower thread (docs/BENCHMARKS.md section 17)."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
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


def _process_cpus() -> list[int]:
    """The CPUs this process may run on, as the main thread was given them (not a pinned thread's)."""
    try:
        return sorted(os.sched_getaffinity(os.getpid()))
    except (AttributeError, OSError):  # not Linux
        return []


def should_pin(pin: Optional[bool], threads: int, cpus: int) -> bool:
    """Whether a team of ``threads`` is pinned on a process with ``cpus`` CPUs: always with ``pin``
    True (if each thread gets a CPU of its own), never with False; unset, only when the team fills
    the CPUs (a process given fewer threads than CPUs, e.g. one of several replicas, is left to the
    scheduler, which places the processes' threads across the cores)."""
    if pin is False or threads > cpus:
        return False
    return bool(pin) or threads == cpus


def pin_team(pin: Optional[bool] = None) -> list[int]:
    """On the calling thread (the executor's): pin its OpenMP team, the threads torch's parallel
    regions run on, one per CPU in order (``should_pin``), or give every thread of it the process's
    CPUs back. Returns the CPUs pinned to ([] when not pinned, or when the kernels that find the
    team's threads are not built)."""
    from . import kernels

    cpus = _process_cpus()
    module = kernels.load()
    if not cpus or module is None:
        return []
    tids = module.team_threads()
    pinned = should_pin(pin, len(tids), len(cpus)) and -1 not in tids
    try:
        for i, tid in enumerate(tids):
            if tid != -1:
                os.sched_setaffinity(tid, {cpus[i]} if pinned else set(cpus))
    except OSError as exc:  # not allowed here (a restricted container): the scheduler places them
        log.info("torch's threads not pinned: %s", exc)
        for tid in tids if pinned else []:  # none left pinned by this call or an earlier one (where allowed)
            try:
                os.sched_setaffinity(tid, set(cpus))
            except OSError:
                pass
        return []
    if pinned:
        log.info("torch's %d threads pinned to CPUs %s", len(tids), ", ".join(map(str, cpus[: len(tids)])))
    return cpus[: len(tids)] if pinned else []


def set_process_threads(threads: int, pin: Optional[bool] = None) -> list[int]:
    """Torch threads for the executor (every model in the process; 0 keeps torch's count, one per
    core), set on its own thread, and its team pinned or not (``pin_team``). Returns the CPUs pinned to."""
    import torch

    from . import kernels
    from .executor import get_executor

    kernels.load()  # a first build (~40 s) here, on the loading thread, not on the executor's between its steps

    def setup() -> list[int]:
        if threads:
            torch.set_num_threads(threads)
        return pin_team(pin)

    return get_executor().call(setup).result()
