"""engine/dali_compat.py: the DALI private attributes the loader relies on
exist in the installed (pinned) DALI, and workers started by a loader leave
Ctrl-C to the training process."""
import signal

import pytest

from engine import dali_compat
from engine.loader import make_loader


@pytest.fixture(scope="module")
def built_loader(demo_store):
    loader = make_loader(demo_store, "highres_no_ela", batch_size=2, img_size=16, workers=1,
                         augment=False, rows=list(range(4)))
    next(iter(loader))   # builds the pipeline and starts its worker
    yield loader
    loader.close()


@pytest.mark.parametrize("name", list(dali_compat.PRIVATE_ATTRIBUTES))
def test_the_private_attributes_exist_in_the_installed_dali(built_loader, name):
    assert hasattr(built_loader._pipe, name), f"DALI's Pipeline has no {name} any more: " \
        f"engine/dali_compat.py uses it to {dali_compat.PRIVATE_ATTRIBUTES[name]}"


def test_reader_workers_ignore_sigint(built_loader):
    for pid in built_loader._pipe._py_pool.pids():
        with open(f"/proc/{pid}/status") as status:
            ignored = int(next(line for line in status if line.startswith("SigIgn:")).split()[1], 16)
        assert ignored & (1 << (signal.SIGINT - 1)), f"worker {pid} would take Ctrl-C"


def test_this_process_takes_ctrl_c_again_once_workers_started():
    before = signal.getsignal(signal.SIGINT)
    with dali_compat.workers_ignore_interrupts():
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) == before

