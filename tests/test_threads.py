"""Torch's threads pinned one per CPU (``engine.threads.pin_team``): the executor's OpenMP team,
found by the kernel's ``team_threads``, each thread on a CPU of its own, and given the process's
CPUs back when not pinned."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from llamawrapper.engine import kernels
from llamawrapper.engine.executor import get_executor
from llamawrapper.engine.threads import _process_cpus, pin_team, should_pin
import tasks_fixtures

# the shared fixtures, bound here so pytest finds them (an unused import would be a lint error)
minilm_folder = tasks_fixtures.minilm_folder
tiny_encoder_dir = tasks_fixtures.tiny_encoder_dir


@pytest.fixture
def team_per_cpu():
    """The executor with one torch thread per CPU of the process, whatever an earlier test set;
    its thread count and pinning put back as the process's load left them afterwards."""
    if kernels.load() is None:
        pytest.skip("the kernels (which find the team's threads) are not built here")
    ex = get_executor()
    before = ex.call(torch.get_num_threads).result()
    ex.call(lambda: torch.set_num_threads(len(_process_cpus()))).result()
    yield ex
    ex.call(lambda: torch.set_num_threads(before)).result()
    ex.call(lambda: pin_team(None)).result()


def test_the_rule_pins_a_team_that_fills_the_cpus_unless_told():
    assert should_pin(None, 2, 2) and should_pin(None, 8, 8)
    assert not should_pin(None, 1, 2)  # one of several processes on the machine: the scheduler places them
    assert should_pin(True, 1, 2) and not should_pin(False, 2, 2)
    assert not should_pin(True, 3, 2)  # more threads than CPUs: two would share one


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
def test_the_executor_team_is_pinned_one_thread_per_cpu_and_released(team_per_cpu):
    cpus, ex = _process_cpus(), team_per_cpu

    def on_executor(pin):
        pinned = pin_team(pin)
        tids = kernels.load().team_threads()
        return pinned, tids, threading.get_native_id(), [os.sched_getaffinity(t) for t in tids]

    pinned, tids, me, masks = ex.call(lambda: on_executor(True)).result()
    n = len(tids)
    assert n == ex.call(torch.get_num_threads).result() == len(cpus)  # the team torch's parallel regions use
    assert tids[0] == me  # the team's first thread is the executor's own
    assert pinned == cpus and masks == [{c} for c in cpus]  # one CPU each, in order
    # the same threads run the next parallel region (the team is kept): still pinned
    assert ex.call(lambda: kernels.load().team_threads()).result() == tids
    pinned, tids, me, masks = ex.call(lambda: on_executor(False)).result()
    assert pinned == [] and all(m == set(cpus) for m in masks)  # every thread gets the process's CPUs back
    assert os.sched_getaffinity(0) == set(cpus)  # this thread was never touched


def test_a_cpu_that_cannot_be_given_leaves_the_threads_unpinned(monkeypatch):
    """Where the OS refuses the affinity (a restricted container), nothing is pinned and a
    model's load goes on."""
    if kernels.load() is None:
        pytest.skip("the kernels (which find the team's threads) are not built here")

    def refuse(tid, cpus):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    assert get_executor().call(lambda: pin_team(True)).result() == []


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
def test_a_refusal_part_way_leaves_no_thread_pinned(monkeypatch, team_per_cpu):
    """The OS pins the first thread, then refuses the second: every thread gets the process's CPUs
    back (the first, and the second if an earlier load had pinned it), so the team is not left half
    pinned."""
    cpus, real, ex = _process_cpus(), os.sched_setaffinity, team_per_cpu
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    tids = ex.call(lambda: kernels.load().team_threads()).result()
    assert len(tids) == len(cpus)

    def second_refused(tid, mask):
        if tid == tids[1] and len(mask) == 1:
            raise PermissionError(1, "Operation not permitted")
        real(tid, mask)

    ex.call(lambda: pin_team(True)).result()  # as a load before this one left it
    monkeypatch.setattr(os, "sched_setaffinity", second_refused)
    try:
        assert ex.call(lambda: pin_team(True)).result() == []
        assert [os.sched_getaffinity(t) for t in tids] == [set(cpus)] * len(tids)
    finally:
        monkeypatch.undo()


def test_a_task_model_load_sets_the_executor_threads(tiny_encoder_dir):
    """A server of task models alone (an embedder here) runs them on the executor with the threads
    its engine settings ask for, as a chat model's load sets them."""
    from llamawrapper.models.versions import ModelSpec
    from llamawrapper.models.loaders import default_loader

    ex = get_executor()
    before = ex.call(torch.get_num_threads).result()
    want = 1 if before != 1 else 2
    try:
        model = default_loader(engine={"threads": want, "pin_threads": False})(ModelSpec(source=str(tiny_encoder_dir)))
        assert model.task == "embedding"  # a task model, not a chat model
        assert ex.call(torch.get_num_threads).result() == want
    finally:
        ex.call(lambda: torch.set_num_threads(before)).result()
        ex.call(lambda: pin_team(None)).result()


def test_the_kernels_are_loaded_on_the_callers_thread_not_the_executors(monkeypatch):
    """``set_process_threads`` loads (on a new machine: builds, ~40 s) the kernels before it goes
    to the executor, so other models' steps do not wait behind a build."""
    from llamawrapper.engine import threads as threads_module

    ex = get_executor()
    seen = []
    real = kernels.load
    monkeypatch.setattr(kernels, "load", lambda: seen.append(ex.on_thread()) or real())
    before = ex.call(torch.get_num_threads).result()
    try:
        threads_module.set_process_threads(before, False)
    finally:
        monkeypatch.undo()
        ex.call(lambda: pin_team(None)).result()
    assert seen and seen[0] is False  # the first load, the one that may build, ran on this thread
