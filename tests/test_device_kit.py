"""benchmarks/device_kit.py on small fake wheels: which packages it carries,
the hash check, splitting and grouping into calls, and the calls' scripts
rebuilding and installing the wheels with no index (the real run, with the
real wheels and gpu_check.py, is in README's "GPU check offline")."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from benchmarks import device_kit as kit

ROOT = Path(__file__).resolve().parents[1]


def fake_wheel(folder: Path, name: str, version: str, requires=(), size=0) -> Path:
    """An installable pure-Python wheel of `name` whose module holds `size` bytes."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{module}/__init__.py": f"VERSION = {version!r}\nPAD = {'x' * size!r}\n",
             f"{dist}.dist-info/METADATA": metadata,
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


@pytest.fixture
def index(tmp_path):
    """A fake index: fetch(name, version) makes the wheel, remembering what was asked."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    requires = {"alpha": ["beta>=1", "onboard", "gamma[extra]"],
                "gamma": ["delta; extra == 'extra'", "epsilon; extra == 'other'",
                          "zeta; python_version < '3.12'", "eta; sys_platform == 'win32'"]}
    asked = []

    def fetch(name, version):
        asked.append(name)
        return fake_wheel(folder, name, version, requires.get(name, ()))
    fetch.asked = asked
    return fetch


LOCK = {"alpha": "1.0", "beta": "2.0", "gamma": "3.0", "delta": "4.0", "epsilon": "5.0", "onboard": "1.0"}


def test_carries_what_the_machine_lacks_through_the_wheels_requirements(index):
    wheels = kit.missing_wheels([Requirement("alpha>=1"), Requirement("Onboard")], {"onboard"}, LOCK, index)
    # gamma's extra brings delta; markers of another extra, an older Python or Windows bring nothing
    assert sorted(wheels) == ["alpha", "beta", "delta", "gamma"]
    assert sorted(index.asked) == sorted(wheels)   # each fetched once, none preinstalled
    assert wheels["beta"].name.startswith("beta-2.0-")


def test_a_package_missing_from_the_lock_or_outside_the_range_is_refused(index):
    with pytest.raises(kit.KitError, match="beta is needed on the GPU machine but not in the lock"):
        kit.missing_wheels([Requirement("alpha")], set(), {k: v for k, v in LOCK.items() if k != "beta"}, index)
    with pytest.raises(kit.KitError, match="beta==0.5 is outside beta>=1"):
        kit.missing_wheels([Requirement("alpha")], set(), {**LOCK, "beta": "0.5"}, index)


def test_hashes_are_recorded_once_then_checked(tmp_path):
    wheel = fake_wheel(tmp_path, "alpha", "1.0")
    record = tmp_path / "kit.sha256"
    kit.check_hashes([wheel], record)
    assert record.read_text() == f"{kit.sha256(wheel)}  {wheel.name}\n"
    kit.check_hashes([wheel], record)
    wheel.write_bytes(wheel.read_bytes() + b"damaged")
    with pytest.raises(kit.KitError, match="differs from .* recorded in"):
        kit.check_hashes([wheel], record)


def test_large_files_are_split_and_every_call_stays_under_the_limit(tmp_path):
    sizes = {"big": 250, "mid": 70, "small": 30, "tiny": 5}
    files = []
    for name, size in sizes.items():
        files.append(tmp_path / name)
        files[-1].write_bytes(b"x" * size)
    items, split = kit.pieces(files, 100)
    assert split == {"big": 3} and [p.size for p in items if p.name.startswith("big")] == [100, 100, 50]
    calls = kit.group(items, 100)
    assert all(sum(p.size for p in call) <= 100 for call in calls)
    assert len(calls) == 4   # 355 bytes: the fewest calls of 100
    assert sorted(p.name for call in calls for p in call) == sorted(p.name for p in items)


def test_the_calls_rebuild_check_and_install_the_wheels_offline(tmp_path):
    wheels = [fake_wheel(tmp_path, "alpha", "1.0", size=3000), fake_wheel(tmp_path, "beta", "2.0", size=200)]
    project = tmp_path / "project.tar"
    subprocess.run(["tar", "-cf", str(project), "-C", str(ROOT), "benchmarks/gpu_check.py", "common"], check=True)
    folders = kit.write_kit(tmp_path / "kit", wheels + [project], 1500)
    assert len(folders) >= 3 and all(sum(f.stat().st_size for f in d.iterdir() if f.name != kit.SCRIPT)
                                     <= 1500 for d in folders)
    machine = tmp_path / "machine"
    for number, folder in enumerate(folders, 1):
        done = subprocess.run(["bash", str(folder / kit.SCRIPT), str(machine), sys.executable, "--", "--help"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"kit call {number}/{len(folders)}" in done.stdout
    # the wheels were joined, checked and installed; gpu_check.py ran from the unpacked project
    assert "--quick" in done.stdout
    site = machine / "site"
    assert (site / "alpha" / "__init__.py").read_text().startswith("VERSION = '1.0'")
    assert (site / "beta").is_dir()


def test_a_call_lost_between_calls_is_named(tmp_path):
    wheels = [fake_wheel(tmp_path, "alpha", "1.0", size=3000)]
    folders = kit.write_kit(tmp_path / "kit", wheels, 1500)
    machine = tmp_path / "machine"
    done = subprocess.run(["bash", str(folders[-1] / kit.SCRIPT), str(machine), sys.executable],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "the machine was given back between calls" in done.stdout


def test_a_damaged_file_stops_the_last_call_before_installing(tmp_path):
    wheels = [fake_wheel(tmp_path, "alpha", "1.0", size=3000)]
    folders = kit.write_kit(tmp_path / "kit", wheels, 1500)
    first_part = next(folders[0].glob("*.part*"))
    first_part.write_bytes(b"?" + first_part.read_bytes()[1:])
    machine = tmp_path / "machine"
    for folder in folders:
        done = subprocess.run(["bash", str(folder / kit.SCRIPT), str(machine), sys.executable],
                              capture_output=True, text=True)
    assert done.returncode == 1 and "missing or damaged" in done.stdout
    assert not (machine / "site").exists()
