"""The DALI internals the loader relies on, in one place.

DALI 2.4 (the pinned version) has no public way to close a pipeline, to
know that its external source hit the end of an epoch, or to start its
parallel workers on the next epoch ahead of time; engine/loader.py needs all
three for its persistent loader. Every access to a private attribute of a
DALI object goes through this module, and tests/test_dali_compat.py checks
that each name in PRIVATE_ATTRIBUTES still exists in the installed DALI, so
a DALI upgrade that moves them fails one test naming the attribute, not a
training run.
"""
from __future__ import annotations

import contextlib
import signal
import threading

from nvidia.dali import Pipeline

# attribute -> what the loader uses it for (checked on a built pipeline by the tests)
PRIVATE_ATTRIBUTES = {
    "_last_iter": "the external source raised StopIteration: the epoch's end was reached",
    "_schedule_py_workers": "start the reader workers on the next epoch's first batches",
    "_shutdown": "stop the pipeline's executor (DALI's own exit handler)",
    "_py_pool": "the reader workers' pool, whose close() stops and joins them",
}


def epoch_ended(pipe: Pipeline) -> bool:
    """Whether the pipeline's source reached the end of its epoch and every
    batch has been taken (reset() then starts the next epoch)."""
    return bool(getattr(pipe, "_last_iter", False)) and pipe.empty()


def schedule_workers(pipe: Pipeline) -> None:
    """Have the reader workers start on the (just reset) epoch's first batches now."""
    schedule = getattr(pipe, "_schedule_py_workers", None)
    if schedule is not None:
        schedule()


def close(pipe: Pipeline) -> None:
    """What DALI's exit handler (_shutdown) and its pool's finaliser (close)
    do, now rather than at exit: the executor stops, the worker processes
    are stopped and joined and their shared memory freed."""
    pool = getattr(pipe, "_py_pool", None)
    try:
        pipe._shutdown()
    finally:
        if pool is not None:
            pool.close()


@contextlib.contextmanager
def workers_ignore_interrupts():
    """Start worker processes (DALI's, within this block) that ignore SIGINT.

    A terminal's Ctrl-C goes to every process of the foreground group: DALI's
    reader workers would each print a KeyboardInterrupt traceback and exit
    while the trainer checkpoints. A spawned Python process keeps SIGINT
    ignored when it starts so (Python installs its KeyboardInterrupt handler
    only over the default disposition), so the workers leave Ctrl-C to the
    trainer, which stops them (close). The price: this process also ignores
    a Ctrl-C pressed while the block runs (the seconds the workers take to
    start). Outside the main thread signals cannot be changed: nothing is done.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
