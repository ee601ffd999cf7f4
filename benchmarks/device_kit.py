"""The kit that runs benchmarks/gpu_check.py on the lent GPU machine, offline.

That machine (docs/device_packages.txt lists what it has: Python 3.12, torch
2.11) reaches no package index, takes at most 64 MiB per call and keeps files
only while it stays warm (30 s after a call). This script, here, once:
  1. walks the project's dependencies (pyproject.toml) through the wheels'
     own requirements, leaving out what the machine has, each at the lock's
     version (requirements/lock-py312.txt);
  2. downloads those cp312 manylinux x86_64 wheels into a cache, once, and
     checks them against the recorded SHA-256 (requirements/device-kit.sha256,
     written by the first download, which pip checks against the index's);
  3. splits a file over --call-mib into parts, and packs the wheels, the parts
     and the project's own files (a tarball of `git ls-files`) into call
     folders OUT/call1, OUT/call2, ... of at most --call-mib each;
  4. writes the script each call runs, OUT/callN/kit.sh: it copies its call's
     files to /tmp/kit; the last one joins the parts, checks every file's
     SHA-256, installs the wheels with `pip install --no-index --no-deps
     --upgrade --target /tmp/kit/site` (nvidia-nvimgcodec into the same
     folder as DALI, whose JPEG operator loads it from there), unpacks the
     project and runs `python3 benchmarks/gpu_check.py --quick` with
     PYTHONPATH set to the site folder and the project.

    python benchmarks/device_kit.py --out .kit      # then, for N = 1..calls:
    device run: command `bash .kit/callN/kit.sh`, carry [".kit/callN"]

Make the calls one after the other, each within 30 s of the last (the
machine keeps /tmp/kit only while warm); the last call's output is the check.
`bash .kit/callN/kit.sh KIT_DIR PYTHON` rehearses it on another machine.
"""
from __future__ import annotations

import argparse
import email.parser
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.atomic import atomic_open  # noqa: E402
from common.help_format import HelpFormatter  # noqa: E402

MIB = 2**20
PROJECT_TAR = "project.tar"
SUMS = "SHA256SUMS"
PARTS = "PARTS"          # lines "name count": files carried in count parts
SCRIPT = "kit.sh"
# the lent machine: CPython 3.12 on Linux x86_64 (pip matches manylinux tags exactly)
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64", "manylinux1_x86_64"]


class KitError(Exception):
    """A problem the kit cannot go past; the message says what to do."""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: Path) -> set[str]:
    """Package names, one a line, '#' comments."""
    return {normalize(line.split("#")[0].strip()) for line in path.read_text().splitlines()
            if line.split("#")[0].strip()}


def read_lock(path: Path) -> dict[str, str]:
    """name -> version of a `pip freeze` file (name==version lines)."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        if "==" not in line:
            raise KitError(f"{path}:{number}: {line!r} is not name==version; regenerate it with pip freeze")
        name, version = line.split("==", 1)
        pins[normalize(name.split("[")[0])] = version.strip()
    return pins


def project_requirements(pyproject: Path) -> list[Requirement]:
    return [Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]


def wheel_requirements(wheel: Path, extras: set[str]) -> list[Requirement]:
    """What a wheel's METADATA requires on the lent machine, with `extras`."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        headers = email.parser.Parser().parsestr(archive.read(metadata).decode())
    needed = []
    for line in headers.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({**TARGET_ENV, "extra": e}) for e in extras | {""}):
            needed.append(requirement)
    return needed


def pip_download(name: str, version: str, cache: Path) -> Path:
    """The cp312 manylinux x86_64 wheel of name==version, downloaded into `cache` once."""
    found = cached_wheel(name, version, cache)
    if found is None:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                               "--python-version", "3.12", "--implementation", "cp", *platforms,
                               "-d", str(cache), f"{name}=={version}"], capture_output=True, text=True)
        found = cached_wheel(name, version, cache)
        if done.returncode != 0 or found is None:
            said = (done.stderr.strip().splitlines() or [""])[-1]
            raise KitError(f"no cp312 manylinux x86_64 wheel of {name}=={version} ({said}); "
                           "is the package index reachable?")
    return found


def cached_wheel(name: str, version: str, cache: Path) -> Path | None:
    prefix = f"{normalize(name).replace('-', '_')}-{version}-"
    return next((w for w in sorted(cache.glob("*.whl")) if w.name.lower().startswith(prefix.lower())), None)


def missing_wheels(roots: list[Requirement], preinstalled: set[str], lock: dict[str, str],
                   fetch) -> dict[str, Path]:
    """name -> wheel of every package the roots need, through the wheels'
    own requirements, that the machine lacks; `fetch(name, version)` gives
    the wheel at the lock's version."""
    wheels, extras, queue = {}, {}, list(roots)
    while queue:
        requirement = queue.pop(0)
        name = normalize(requirement.name)
        if name in preinstalled:
            continue
        new_extras = set(requirement.extras) - extras.get(name, set())
        if name in wheels and not new_extras:
            continue
        if name not in lock:
            raise KitError(f"{name} is needed on the GPU machine but not in the lock: install it in the "
                           "Python 3.12 environment and regenerate the lock (README, 'Installing')")
        if not requirement.specifier.contains(lock[name], prereleases=True):
            raise KitError(f"the lock's {name}=={lock[name]} is outside {requirement}")
        extras[name] = extras.get(name, set()) | set(requirement.extras)
        wheels[name] = wheels.get(name) or fetch(name, lock[name])
        queue += wheel_requirements(wheels[name], extras[name])
    return wheels


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def check_hashes(files: list[Path], record: Path) -> None:
    """Each file's SHA-256 against `record` ("sha256  name" lines); files not
    yet recorded are added to it."""
    known = {}
    if record.exists():
        known = {line.split()[1]: line.split()[0] for line in record.read_text().splitlines() if line.strip()}
    for path in files:
        digest = sha256(path)
        if known.setdefault(path.name, digest) != digest:
            raise KitError(f"{path}: SHA-256 {digest} differs from {known[path.name]} recorded in {record}; "
                           f"delete the file and run again to download it anew")
    with atomic_open(record, "w") as f:
        f.writelines(f"{digest}  {name}\n" for name, digest in sorted(known.items()))


@dataclass(frozen=True)
class Piece:
    """One file a call carries: a whole file or part `part` of `name`."""

    source: Path
    name: str        # the name in the call folder
    offset: int
    size: int


def pieces(files: list[Path], limit: int) -> tuple[list[Piece], dict[str, int]]:
    """Every file as pieces of at most `limit` bytes, and the part counts of
    the files split."""
    out, split = [], {}
    for path in files:
        size = path.stat().st_size
        if size <= limit:
            out.append(Piece(path, path.name, 0, size))
            continue
        count = -(-size // limit)
        split[path.name] = count
        out += [Piece(path, f"{path.name}.part{k:03d}", k * limit, min(limit, size - k * limit))
                for k in range(count)]
    return out, split


def group(items: list[Piece], limit: int) -> list[list[Piece]]:
    """Pieces packed into as few calls of at most `limit` bytes as first-fit
    decreasing finds (each piece is at most `limit`)."""
    calls: list[list[Piece]] = []
    for piece in sorted(items, key=lambda p: (-p.size, p.name)):
        fits = next((c for c in calls if sum(p.size for p in c) + piece.size <= limit), None)
        if fits is None:
            calls.append(fits := [])
        fits.append(piece)
    return calls


def project_tarball(repo: Path, out: Path) -> Path:
    """The project's tracked files (`git ls-files`), as they are in the work tree."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    with tarfile.open(out, "w") as tar:
        for name in sorted(n for n in names.decode().split("\0") if n):
            if (repo / name).is_file():
                tar.add(repo / name, arcname=name)
    return out


def write_piece(piece: Piece, folder: Path) -> None:
    with open(piece.source, "rb") as src, open(folder / piece.name, "wb") as dst:
        src.seek(piece.offset)
        dst.write(src.read(piece.size))


def call_script(number: int, calls: int) -> str:
    """The script call `number` of `calls` runs: bash kit.sh [KIT_DIR [PYTHON]] [-- gpu_check args]."""
    last = number == calls
    head = f"""#!/usr/bin/env bash
# Call {number} of {calls} of the GPU check's kit (benchmarks/device_kit.py wrote it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kit=${{1:-/tmp/kit}}; python=${{2:-python3}}
shift $(( $# < 2 ? $# : 2 )); [ "${{1:-}}" = "--" ] && shift
mkdir -p "$kit/files"
find "$here" -maxdepth 1 -type f ! -name {SCRIPT} -exec cp {{}} "$kit/files/" \\;
echo "kit call {number}/{calls}: $(ls "$here" | grep -vc '^{SCRIPT}$') files copied to $kit/files"
"""
    if not last:
        return head + f'echo "next: call {number + 1} within 30 s (the machine keeps $kit only while warm)"\n'
    return head + f"""cd "$kit/files"
while read -r name count; do
  for k in $(seq 0 $((count - 1))); do
    part=$(printf '%s.part%03d' "$name" "$k")
    [ -f "$part" ] || {{ echo "kit: $part missing: the machine was given back between calls; run calls 1-{calls} again, each within 30 s"; exit 1; }}
  done
  cat $(printf "$name.part%03d " $(seq 0 $((count - 1)))) > "$name" && rm -f "$name".part*
done < {PARTS}
sha256sum --quiet -c {SUMS} || {{ echo "kit: a file is missing or damaged (above): run calls 1-{calls} again"; exit 1; }}
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
  --target "$kit/site" "$kit"/files/*.whl
rm -rf "$kit/project" && mkdir -p "$kit/project" && tar -xf {PROJECT_TAR} -C "$kit/project"
cd "$kit/project"
export PYTHONPATH="$kit/site:$kit/project"
exec "$python" benchmarks/gpu_check.py --quick --work "$kit/work" "$@"
"""


def write_kit(out: Path, files: list[Path], call_bytes: int) -> list[Path]:
    """The call folders (out/call1, ...) holding `files`, their sums and scripts."""
    shutil.rmtree(out, ignore_errors=True)
    items, split = pieces(files, call_bytes)
    calls = group(items, call_bytes)
    sums = "".join(f"{sha256(f)}  {f.name}\n" for f in files).encode()
    parts = "".join(f"{name} {count}\n" for name, count in split.items()).encode()
    folders = []
    for number, call in enumerate(calls, 1):
        folder = out / f"call{number}"
        folder.mkdir(parents=True)
        for piece in call:
            write_piece(piece, folder)
        (folder / SCRIPT).write_text(call_script(number, len(calls)))
        folders.append(folder)
    (folders[-1] / SUMS).write_bytes(sums)
    (folders[-1] / PARTS).write_bytes(parts)
    return folders


def tree_bytes(repo: Path) -> int:
    """Bytes of the tracked files, which travel with every call."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    return sum((repo / n).stat().st_size for n in names.decode().split("\0") if n and (repo / n).is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / ".kit", help="the call folders (replaced)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/devicekit-wheels"),
                   help="downloaded wheels, kept between runs")
    p.add_argument("--lock", type=Path, default=ROOT / "requirements" / "lock-py312.txt")
    p.add_argument("--preinstalled", type=Path, default=ROOT / "docs" / "device_packages.txt")
    p.add_argument("--hashes", type=Path, default=ROOT / "requirements" / "device-kit.sha256",
                   help="the wheels' recorded SHA-256")
    p.add_argument("--call-mib", type=int, default=60, help="most MiB one call carries")
    args = p.parse_args(argv)
    try:
        limit = args.call_mib * MIB - 64 * 1024   # room for the script and sums
        if tree_bytes(ROOT) + limit > 64 * MIB:
            raise KitError(f"the tracked files ({tree_bytes(ROOT) / MIB:.1f} MiB) travel with every call: "
                           f"with --call-mib {args.call_mib} a call exceeds 64 MiB; lower --call-mib")
        args.cache.mkdir(parents=True, exist_ok=True)
        wheels = missing_wheels(project_requirements(ROOT / "pyproject.toml"), read_names(args.preinstalled),
                                read_lock(args.lock), lambda n, v: pip_download(n, v, args.cache))
        check_hashes(sorted(wheels.values()), args.hashes)
        files = sorted(wheels.values()) + [project_tarball(ROOT, args.cache / PROJECT_TAR)]
        folders = write_kit(args.out, files, limit)
    except KitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(f.stat().st_size for f in files)
    print(f"{len(wheels)} wheels the GPU machine lacks ({total / MIB:.0f} MiB with the project): "
          + ", ".join(sorted(wheels)))
    for folder in folders:
        size = sum(f.stat().st_size for f in folder.iterdir())
        rel = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
        print(f"  {folder.name}: {size / MIB:5.1f} MiB  command: bash {rel}/{SCRIPT}   carry: [\"{rel}\"]")
    print("Make the calls in order, each within 30 s of the last; the last runs gpu_check.py --quick.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
