"""The signal handler of a training run (mgn/train/preemption.py), called as the kernel would call it."""
from __future__ import annotations

import os
import signal
import time

import pytest

from mgn.cli import EXIT_STOPPED
from mgn.train import preemption


class Exited(Exception):
    pass


@pytest.fixture
def handler(monkeypatch):
    """The handler as installed in this process, its lines collected and os._exit turned into an exception."""
    lines = []
    monkeypatch.setattr(preemption, "_received", [])
    monkeypatch.setattr(preemption, "_installed_in", os.getpid())

    def exit_(code):
        raise Exited(code)
    monkeypatch.setattr(preemption.os, "_exit", exit_)
    monkeypatch.setattr(preemption.os, "write", lambda fd, data: lines.append(data.decode()) or len(data))
    return lines


def test_a_second_ctrl_c_that_lands_inside_the_first_handler_stops_at_once(handler, monkeypatch):
    # CPython runs a handler again inside a running one: the second Ctrl-C may come the moment the first's
    # line is out. The handler once recorded the signal after writing that line, took the nested second
    # Ctrl-C for a first, and the run saved instead of stopping.
    write = preemption.os.write

    def second_ctrl_c_on_the_first_line(fd, data):
        write(fd, data)
        if len(handler) == 1:
            preemption._handler(signal.SIGINT, None)
        return len(data)
    monkeypatch.setattr(preemption.os, "write", second_ctrl_c_on_the_first_line)
    killed = []
    monkeypatch.setattr(preemption.multiprocessing, "active_children",
                        lambda: [type("Worker", (), {"pid": pid}) for pid in (101, 102)])
    monkeypatch.setattr(preemption.os, "kill", lambda pid, signum: killed.append((pid, signum)))
    with pytest.raises(Exited) as stopped:
        preemption._handler(signal.SIGINT, None)
    assert stopped.value.args == (EXIT_STOPPED,)
    assert [line.split(":")[1].strip() for line in handler] == ["Ctrl-C", "Ctrl-C again"]
    # the loader workers end first: one handing a batch over as its reader vanished printed a traceback
    assert killed == [(101, signal.SIGKILL), (102, signal.SIGKILL)]


def test_one_ctrl_c_or_sigterm_is_recorded_and_the_run_goes_on_to_save(handler):
    preemption._handler(signal.SIGTERM, None)
    preemption._handler(signal.SIGINT, None)
    assert preemption.requested() and not preemption.wants_requeue()
    assert preemption.received() == "SIGTERM, SIGINT"
    assert len(handler) == 1 and handler[0].startswith("MGN: Ctrl-C: saving a checkpoint")


def test_a_forked_child_that_has_not_set_its_own_signals_stays_silent(handler, monkeypatch):
    # a loader worker forked with the handler, signalled with the whole group before its start ignores the
    # run's signals: the run's own process got the same signal and speaks for it
    monkeypatch.setattr(preemption, "_installed_in", os.getpid() + 1)
    preemption._handler(signal.SIGINT, None)
    preemption._handler(signal.SIGINT, None)
    assert handler == [] and not preemption.requested()


@pytest.fixture
def default_signals():
    """SIGINT and SIGTERM as a plain process has them, put back after the test."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def test_a_run_gives_the_signals_back_at_its_end_and_forgets_an_earlier_runs(default_signals):
    # an in-process run (a notebook, a test session) once kept the run's handler for good: Ctrl-C no longer
    # interrupted anything, and every process forked later lived on after a SIGTERM
    preemption.install()
    assert signal.getsignal(signal.SIGINT) is preemption._handler
    preemption._received.append("SIGTERM")
    preemption.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert preemption.received() == "SIGTERM"  # still read after the run (train.py's exit code)
    preemption.install()
    try:
        assert not preemption.requested()
    finally:
        preemption.restore()


def test_a_child_forked_during_a_run_ends_on_sigterm_as_before(default_signals):
    # a multiprocessing pool forked from a process that had the run's handler: its workers ignored the
    # SIGTERM of Pool.terminate and the parent waited for them for ever (a CI run hung in test_shards.py)
    preemption.install()
    try:
        child = os.fork()
        if child == 0:  # the child: waits to be ended
            time.sleep(60)
            os._exit(0)
        time.sleep(0.2)
        os.kill(child, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while (ended := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if ended[0] == 0:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            pytest.fail("the forked child lived on after SIGTERM")
        assert os.WIFSIGNALED(ended[1]) and os.WTERMSIG(ended[1]) == signal.SIGTERM
    finally:
        preemption.restore()
