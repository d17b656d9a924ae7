"""gpucnn.bench.Timer.pair on the CPU: how gpucnn's and PyTorch's runs are ordered so
that a shared machine's changing load weighs on both alike, and which runs count."""
import time

import pytest

from gpucnn import bench

threadpoolctl = pytest.importorskip("threadpoolctl")


def _recorded(slow_calls=()):
    """(ours, theirs, calls): two functions that note each call in calls ('o', 't');
    ours sleeps 50 ms on its calls numbered in slow_calls (0-based)."""
    calls = []

    def ours():
        if calls.count("o") in slow_calls:
            time.sleep(0.05)
        calls.append("o")
    return ours, lambda: calls.append("t"), calls


def test_with_threads_the_two_take_turns_and_each_turn_starts_untimed(cpu_threads):
    cpu_threads(2)
    # repeat 10 in 5 turns: 2 warm-up runs and 2 timed, then 1 untimed and 2 timed
    untimed = {0, 1, 4, 7, 10, 13}
    ours, theirs, calls = _recorded(slow_calls=untimed)
    t_ours, t_theirs = bench.Timer("cpu", repeat=10, warmup=2).pair(ours, theirs)
    assert "".join(calls) == "oooo" + "tttt" + ("ooo" + "ttt") * 4
    assert t_ours < 25 and t_theirs < 25  # no untimed (slow) run was counted


def test_one_thread_alternates_run_by_run(cpu_threads):
    cpu_threads(1)
    ours, theirs, calls = _recorded(slow_calls={0, 1})
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        t_ours, _ = bench.Timer("cpu", repeat=4, warmup=2).pair(ours, theirs)
    # each one's 2 warm-up runs and first timed run, then one timed run each in turn
    assert "".join(calls) == "ooo" + "ttt" + "ot" * 3
    assert t_ours < 25


@pytest.mark.parametrize("repeat", [1, 3, 7, 12])
def test_every_repeat_is_timed_once(cpu_threads, repeat):
    cpu_threads(2)
    ours, theirs, calls = _recorded()
    bench.Timer("cpu", repeat=repeat, warmup=2).pair(ours, theirs)
    turns = min(bench.TURNS, repeat)
    assert calls.count("o") == calls.count("t") == 2 + (turns - 1) + repeat
