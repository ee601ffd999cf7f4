"""pyproject.toml and the locks: Python 3.11 and 3.12, every locked version
inside the declared ranges, s3fs only in an extra and local stores without it."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from benchmarks.device_kit import normalize, read_lock

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_python_3_11_and_3_12_are_accepted():
    accepted = SpecifierSet(PROJECT["requires-python"])
    assert "3.11.7" in accepted and "3.12.3" in accepted and "3.10.13" not in accepted


@pytest.mark.parametrize("lock", ["lock-py311.txt", "lock-py312.txt"])
def test_every_locked_version_is_inside_the_ranges(lock):
    pins = read_lock(ROOT / "requirements" / lock)
    required = [Requirement(r) for r in PROJECT["dependencies"]] + [
        Requirement(r) for extra in PROJECT["optional-dependencies"].values() for r in extra]
    for requirement in required:
        name = normalize(requirement.name)
        assert name in pins, f"{lock}: {name} not locked"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{lock}: {name}=={pins[name]}"


def test_the_device_torch_is_accepted():
    torch = next(Requirement(r) for r in PROJECT["dependencies"] if r.startswith("torch>"))
    assert torch.specifier.contains("2.11.0")


def test_s3fs_is_an_extra_and_a_local_store_opens_without_it(demo_store):
    assert not any(Requirement(r).name == "s3fs" for r in PROJECT["dependencies"])
    assert any(Requirement(r).name == "s3fs" for r in PROJECT["optional-dependencies"]["s3"])
    blocked = ("import sys; sys.modules['s3fs'] = None\n"
               "from engine import store\n"
               f"print(len(store.read_meta(store.open_store({str(demo_store)!r}))['label']))")
    done = subprocess.run([sys.executable, "-c", blocked], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0 and int(done.stdout) > 0, done.stderr
