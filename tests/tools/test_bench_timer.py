"""gpucnn.bench.Timer.pair on the CPU: how gpucnn's and PyTorch's runs are ordered so
that a shared machine's changing load weighs on both alike, and which runs count.
A clock that the timed functions themselves move on stands in for perf_counter."""
import pytest

from gpucnn.tools import bench

threadpoolctl = pytest.importorskip("threadpoolctl")


class Runs:
    """ours and theirs, which note each call in calls ('o', 't') and take, on the
    clock, 1 + i ms (ours' call i) and 100 + i ms (theirs' call i)."""

    def __init__(self):
        self.now, self.calls = 0.0, []

    def clock(self):
        return self.now

    def _run(self, name, base):
        self.now += (base + self.calls.count(name) + 1) / 1e3
        self.calls.append(name)

    def ours(self):
        self._run("o", 0)

    def theirs(self):
        self._run("t", 100)


def _median(values):
    values = sorted(values)
    return (values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2


def test_with_threads_the_two_take_turns_and_each_turn_starts_untimed(cpu_threads):
    cpu_threads(2)
    runs = Runs()
    t_ours, t_theirs = bench.Timer("cpu", 10, warmup=2, clock=runs.clock).pair(runs.ours,
                                                                             runs.theirs)
    # repeat 10 in 5 turns: 2 warm-up runs and 2 timed, then 1 untimed and 2 timed
    assert "".join(runs.calls) == "oooo" + "tttt" + ("ooo" + "ttt") * 4
    timed = [2, 3, 5, 6, 8, 9, 11, 12, 14, 15]  # each one's calls that count
    assert t_ours == pytest.approx(_median(1 + i for i in timed))
    assert t_theirs == pytest.approx(_median(101 + i for i in timed))


def test_one_thread_alternates_run_by_run(cpu_threads):
    cpu_threads(1)
    runs = Runs()
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        t_ours, t_theirs = bench.Timer("cpu", 4, warmup=2, clock=runs.clock).pair(
            runs.ours, runs.theirs)
    # each one's 2 warm-up runs and first timed run, then one timed run each in turn
    assert "".join(runs.calls) == "ooo" + "ttt" + "ot" * 3
    assert (t_ours, t_theirs) == pytest.approx((_median([3, 4, 5, 6]), _median([103, 104, 105, 106])))


@pytest.mark.parametrize("repeat", [1, 3, 7, 12])
@pytest.mark.parametrize("warmup", [0, 2])
def test_every_repeat_is_timed_once_and_the_rest_not(cpu_threads, repeat, warmup):
    cpu_threads(2)
    runs = Runs()
    t_ours, _ = bench.Timer("cpu", repeat, warmup=warmup, clock=runs.clock).pair(runs.ours,
                                                                               runs.theirs)
    turns = min(bench.TURNS, repeat)
    first = max(warmup, 1)  # a turn's first run is untimed, the first turn's warm-up too
    timed, i = [], first
    for turn in range(turns):
        count = repeat // turns + (turn < repeat % turns)
        timed += range(i, i + count)
        i += count + 1
    assert runs.calls.count("o") == runs.calls.count("t") == first + (turns - 1) + repeat
    assert t_ours == pytest.approx(_median(1 + i for i in timed))
