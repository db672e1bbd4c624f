"""kvmdbgfs/build_backend.py: the wheel ``pip install`` makes carries the compiled modules, tagged for this
interpreter, and the package it installs uses them; where nothing is compiled the wheel is pure Python."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from kvmdbgfs import native, native_build
from kvmdbgfs.build_backend import platform_tag

REPO = Path(__file__).resolve().parents[1]
BASE_ENV = {key: value for key, value in os.environ.items() if key != "KVMDBGFS_PURE"}  # the run's own choice aside
# The backend's build_wheel, as pip calls it, with one module to compile instead of sixty (seconds, not minutes).
DRIVER = """
import sys
from kvmdbgfs import build_backend, native_build
native_build.compiled_sources = lambda root: [root / "guest" / "vaddr.py"]
print(build_backend.build_wheel(sys.argv[1]))
"""


def build_wheel(tmp_path: Path, **env: str) -> Path:
    """The backend run from a copy of the project (an in-tree build writes build/ and *.egg-info beside it)."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", native.NATIVE_ROOT.name)
    for name in ("kvmdbgfs", "workloads"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    (tmp_path / "dist").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path / "dist")],
        cwd=source,
        env={**BASE_ENV, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "dist" / done.stdout.splitlines()[-1]


def test_the_wheel_carries_a_build_the_installed_package_uses(tmp_path: Path) -> None:
    if reason := native_build.unbuildable():
        pytest.skip(f"nothing can be compiled here: {reason}")
    wheel = build_wheel(tmp_path)
    assert wheel.name == f"kvmdbgfs-0.1.0-{platform_tag()}.whl"
    libraries = [name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(EXTENSION_SUFFIXES[0])]
    assert libraries and all(name.startswith("kvmdbgfs/_native/") for name in libraries)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", site, wheel],
        check=True,
        timeout=120,
    )
    probe = "import kvmdbgfs.guest.vaddr as m, kvmdbgfs.native as n; print(n.installed); print(m.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**BASE_ENV, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    build, module = done.stdout.splitlines()
    assert Path(build).parent == site / "kvmdbgfs" / "_native"
    assert module == str(Path(build) / "kvmdbgfs" / "guest" / f"vaddr{EXTENSION_SUFFIXES[0]}")


def test_a_pure_build_makes_the_pure_wheel(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, KVMDBGFS_PURE="1")
    assert wheel.name == "kvmdbgfs-0.1.0-py3-none-any.whl"
    assert not [name for name in zipfile.ZipFile(wheel).namelist() if "_native" in name or name.endswith(".so")]
