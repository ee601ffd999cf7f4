"""preprocess/cluster.py: tasks in this process, on a local Dask cluster of
worker processes, and on a running cluster; a task's error reaching the
caller as itself; no worker process left behind after an error."""
from __future__ import annotations

import multiprocessing.resource_tracker
import os
import time

import cv2
import psutil
import pytest
from distributed import Client, LocalCluster

from preprocess.cluster import ClusterError, TaskRunner, run_tasks


class BadInput(Exception):
    """A project-style error a task raises: it must come back as this class."""


def square_where(task: int) -> tuple[int, int, int, str | None]:
    """task², and the process, OpenCV threads and Numba threads it ran with."""
    return task * task, os.getpid(), cv2.getNumThreads(), os.environ.get("NUMBA_NUM_THREADS")


def fail_on_three(task: tuple[int, str]) -> int:
    """Marks that it started, then fails on task 3; the others take a while."""
    number, folder = task
    open(os.path.join(folder, f"started-{number}"), "w").close()
    if number == 3:
        raise BadInput(f"case {number}: unreadable PNG")
    time.sleep(0.3)
    return number


def my_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture
def children_before():
    """This process's children before the test; multiprocessing's resource
    tracker, which the first spawned worker starts and which lives as long as
    this process, is started first so that it is not counted as left behind."""
    multiprocessing.resource_tracker.ensure_running()
    return my_children()


def assert_no_process_left(before: set[int]) -> None:
    left = [psutil.Process(pid) for pid in my_children() - before if psutil.pid_exists(pid)]
    _, alive = psutil.wait_procs(left, timeout=10)
    assert not alive, [p.cmdline() for p in alive]


def test_one_worker_runs_in_this_process_without_a_cluster(children_before):
    with TaskRunner(workers=1) as runner:
        results = list(runner.map_unordered(square_where, range(5)))
        assert runner.slots == 1
    assert sorted(r[0] for r in results) == [0, 1, 4, 9, 16]
    assert {r[1] for r in results} == {os.getpid()}
    assert my_children() == children_before


def test_a_local_cluster_gives_the_in_process_results_in_single_threaded_workers():
    tasks = list(range(12))
    in_process = list(run_tasks(square_where, tasks, workers=1))
    with TaskRunner(workers=2) as runner:
        assert runner.slots == 2
        on_cluster = list(runner.map_unordered(square_where, tasks))
    assert sorted(r[0] for r in on_cluster) == sorted(r[0] for r in in_process)
    assert len(on_cluster) == len(tasks)
    pids = {r[1] for r in on_cluster}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {(r[2], r[3]) for r in on_cluster} == {(1, "1")}   # one core each: no thread pools


@pytest.mark.parametrize("workers", [1, 2])
def test_a_task_error_arrives_as_itself_cancels_the_rest_and_leaves_no_process(
        workers, tmp_path, children_before):
    tasks = [(n, str(tmp_path)) for n in range(40)]
    with pytest.raises(BadInput, match=r"^case 3: unreadable PNG$"):
        with TaskRunner(workers=workers) as runner:
            for _ in runner.map_unordered(fail_on_three, tasks):
                pass
    assert_no_process_left(children_before)
    started = len(list(tmp_path.glob("started-*")))
    time.sleep(0.5)
    assert len(list(tmp_path.glob("started-*"))) == started < len(tasks)


def test_an_interrupt_in_the_caller_stops_the_local_cluster(children_before):
    with pytest.raises(KeyboardInterrupt):
        with TaskRunner(workers=2) as runner:
            for _ in runner.map_unordered(square_where, range(20)):
                assert len(my_children() - children_before) >= 2   # the workers are running
                raise KeyboardInterrupt   # Ctrl-C while results arrive
    assert_no_process_left(children_before)


def test_a_running_cluster_does_the_work_and_is_left_running():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as cluster:
        with TaskRunner(workers=None, cluster=cluster.scheduler_address) as runner:
            results = list(runner.map_unordered(square_where, range(8)))
        assert sorted(r[0] for r in results) == [n * n for n in range(8)]
        with Client(cluster) as client:
            worker_pids = set(client.run(os.getpid).values())
        assert {r[1] for r in results} <= worker_pids
        # a second build on the same cluster: it was disconnected from, not stopped
        assert sorted(run_tasks(abs, [-1, -2], workers=None, cluster=cluster.scheduler_address)) == [1, 2]
        assert len(cluster.scheduler_info["workers"]) == 2


def test_an_unreachable_cluster_is_named_with_what_to_do():
    with pytest.raises(ClusterError, match=r"no Dask scheduler answered at tcp://127.0.0.1:9 .*--workers N"):
        with TaskRunner(workers=None, cluster="tcp://127.0.0.1:9", connect_timeout=1):
            pass


def test_workers_and_cluster_exclude_each_other():
    with pytest.raises(ValueError, match="not both"):
        TaskRunner(workers=2, cluster="tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="at least 1"):
        TaskRunner(workers=0)


def test_the_progress_bar_counts_completed_tasks(capsys):
    assert sorted(run_tasks(abs, [-3, -1, -2], progress=True, desc="blocks")) == [1, 2, 3]
    bar = capsys.readouterr().err
    assert "blocks: 100%" in bar and "3/3" in bar
