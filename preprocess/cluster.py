"""Where a build's tasks run: in this process, on a local Dask cluster, or
on a running one.

    with TaskRunner(workers=4) as runner:              # a LocalCluster of 4 processes
        for result in runner.map_unordered(decode_block, blocks, progress=True, desc="blocks"):
            ...                                        # in completion order: the caller orders them
    TaskRunner(workers=1)                              # this process, no cluster: tiny stores
    TaskRunner(cluster="tcp://10.0.0.5:8786")          # a running scheduler (`dask scheduler`)

The engine is Dask distributed, not Ray (docs/performance.md, "Build
engine": it starts a cluster in about a third of the time, runs a task with
as little overhead, and is a few pure-Python wheels where Ray is a 70 MB
native one the GPU machines lack).

A task's exception reaches the caller as itself (same class and message:
Dask pickles it back), and the tasks not yet finished are cancelled. Leaving
the `with` block, by an error or Ctrl-C included, stops a local cluster and
its worker processes; a running cluster is only disconnected from.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

Task = TypeVar("Task")
Result = TypeVar("Result")

# Each worker is one process on one core: OpenCV's, the BLAS libraries' and
# Numba's own thread pools would only contend for it. Dask's nanny already sets
# OMP/MKL/OPENBLAS_NUM_THREADS=1 (distributed.nanny.pre-spawn-environ).
WORKER_ENVIRONMENT = {"NUMBA_NUM_THREADS": "1"}
# tasks in flight per worker thread: one running and one waiting, so that a
# worker never idles, while a long plan's tasks stay here until there is room
IN_FLIGHT_PER_THREAD = 2
CONNECT_TIMEOUT_S = 10.0


class ClusterError(RuntimeError):
    """The cluster cannot be started or reached; the message says what to do."""


def one_thread_per_process() -> None:
    """The worker side's thread limits that only a call can set (OpenCV's)."""
    import cv2
    cv2.setNumThreads(1)


def _run_in_worker(function: Callable[[Task], Result], task: Task) -> Result:
    # per task rather than a worker plugin: it also holds on a running
    # cluster's workers, without leaving a plugin registered there
    one_thread_per_process()
    return function(task)


class TaskRunner:
    """Runs tasks in this process (workers=1), on a local cluster of
    `workers` single-threaded processes, or on the running cluster at
    `cluster` (then `workers` is None: the cluster's own workers do the work).
    Use it as a context manager; `slots` is how many tasks run at once."""

    def __init__(self, workers: int | None = 1, cluster: str | None = None, *,
                 connect_timeout: float = CONNECT_TIMEOUT_S):
        if cluster is not None and workers is not None:
            raise ValueError("give workers or cluster, not both: a running cluster's workers do the work")
        if cluster is None and (workers is None or workers < 1):
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.workers = workers
        self.cluster = cluster
        self.connect_timeout = connect_timeout
        self._local_cluster = None
        self._client = None

    def __enter__(self) -> TaskRunner:
        if self.cluster is not None:
            self._client = self._connect(self.cluster)
        elif self.workers > 1:
            self._start_local_cluster()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _connect(self, address: str):
        from distributed import Client
        try:
            return Client(address, timeout=self.connect_timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"no Dask scheduler answered at {address} within {self.connect_timeout:g} s ({exc}); "
                f"start one there (`dask scheduler`, then `dask worker {address}` on each machine) "
                "or build on this machine with --workers N instead of --cluster") from None

    def _start_local_cluster(self) -> None:
        from distributed import Client, LocalCluster
        try:
            # ports 0 and no dashboard: concurrent builds on one machine never
            # collide (the scheduler's HTTP server, which runs even without a
            # dashboard, would otherwise try 8787 and warn)
            self._local_cluster = LocalCluster(
                n_workers=self.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                scheduler_port=0, dashboard_address=None, silence_logs=logging.ERROR,
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, env=WORKER_ENVIRONMENT)
            self._client = Client(self._local_cluster, set_as_default=False)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Disconnect; stop the local cluster and its processes if this runner started one."""
        client, cluster = self._client, self._local_cluster
        self._client = self._local_cluster = None
        try:
            if client is not None:
                client.close()
        finally:
            if cluster is not None:
                cluster.close()

    @property
    def slots(self) -> int:
        """Tasks that run at once: the workers' threads (1 in this process)."""
        if self._client is None:
            return 1
        workers = self._client.scheduler_info(n_workers=-1)["workers"].values()
        return max(1, sum(w["nthreads"] for w in workers))

    def map_unordered(self, function: Callable[[Task], Result], tasks: Iterable[Task], *,
                      progress: bool = False, desc: str = "tasks") -> Iterator[Result]:
        """function(task) of every task, yielded as each completes (any order).
        `function` and the tasks must pickle (a module-level function) unless
        the runner is in-process; a task's exception is raised here, as itself,
        and the tasks not yet finished are cancelled."""
        total = len(tasks) if hasattr(tasks, "__len__") else None
        with tqdm(total=total, desc=desc, unit="task", disable=not progress) as bar:
            results = (map(function, tasks) if self._client is None
                       else self._completed(function, iter(tasks)))
            for result in results:
                bar.update()
                yield result

    def _completed(self, function: Callable[[Task], Result], tasks: Iterator[Task]) -> Iterator[Result]:
        from distributed import as_completed
        window = IN_FLIGHT_PER_THREAD * self.slots
        # submitted and not yet yielded; a yielded future is dropped at once,
        # which frees its result on the worker
        pending = set()
        running = as_completed(loop=self._client.loop)
        try:
            for task in tasks:
                # pure=False: equal tasks are separate work, and keys need no hashing of the task
                future = self._client.submit(_run_in_worker, function, task, pure=False)
                pending.add(future)
                running.add(future)
                if len(pending) >= window:
                    future = next(running)
                    pending.discard(future)
                    yield future.result()   # raises the task's own exception
            for future in running:
                pending.discard(future)
                yield future.result()
        finally:
            if pending and self._client is not None:
                self._client.cancel(list(pending))

def run_tasks(function: Callable[[Task], Result], tasks: Iterable[Task], *, workers: int | None = 1,
              cluster: str | None = None, progress: bool = False, desc: str = "tasks") -> Iterator[Result]:
    """TaskRunner(workers, cluster).map_unordered(function, tasks) in one call:
    the cluster lives as long as the iteration (close the iterator, or run
    it to the end, to stop it)."""
    with TaskRunner(workers, cluster) as runner:
        yield from runner.map_unordered(function, tasks, progress=progress, desc=desc)
