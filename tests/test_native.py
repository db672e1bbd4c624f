"""kvmdbgfs/native.py: a build of the compiled modules is used only for the sources it was built from."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from kvmdbgfs import native, native_build

SUFFIX = EXTENSION_SUFFIXES[0]


def package(root: Path) -> Path:
    (root / "kvmdbgfs" / "guest").mkdir(parents=True)
    (root / "kvmdbgfs" / "__init__.py").write_text("")
    (root / "kvmdbgfs" / "guest" / "mm.py").write_text("X = 1\n")
    return root / "kvmdbgfs"


def key(pkg: Path) -> str:
    return native.source_key(native.project_sources(pkg))


def test_an_edit_to_any_source_changes_the_key(tmp_path: Path) -> None:
    pkg = package(tmp_path)
    first = key(pkg)
    assert key(pkg) == first
    (pkg / "guest" / "mm.py").write_text("X = 2\n")
    edited = key(pkg)
    assert edited != first
    (pkg / "other.py").write_text("")  # not a compiled module: the key still moves
    assert key(pkg) not in (first, edited)


def test_a_checkout_and_its_installed_package_have_one_key(tmp_path: Path) -> None:
    """workloads/ sits beside the package in a checkout and inside it once installed: the same sources."""
    checkout = package(tmp_path / "checkout")
    (tmp_path / "checkout" / "workloads").mkdir()
    (tmp_path / "checkout" / "workloads" / "idle.py").write_text("UPTIME = 10\n")
    installed = package(tmp_path / "site-packages")
    (installed / "workloads").mkdir()
    (installed / "workloads" / "idle.py").write_text("UPTIME = 10\n")
    assert native.project_sources(checkout) == native.project_sources(installed)
    assert "kvmdbgfs/workloads/idle.py" in native.project_sources(checkout)
    assert key(checkout) == key(installed)


def test_a_workload_edit_moves_the_boot_cache_digest_but_not_the_key(tmp_path: Path) -> None:
    """No compiled module imports a workload; every boot snapshot depends on them."""
    pkg = package(tmp_path)
    (tmp_path / "workloads").mkdir()
    (tmp_path / "workloads" / "idle.py").write_text("UPTIME = 10\n")
    before = native.project_sources(pkg)
    (tmp_path / "workloads" / "idle.py").write_text("UPTIME = 20\n")
    after = native.project_sources(pkg)
    assert native.source_key(after) == native.source_key(before)
    assert native.sources_digest(after) != native.sources_digest(before)


def test_a_build_of_other_sources_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "NATIVE_ROOT", tmp_path)
    (tmp_path / "0123456789abcdef0123456789abcdef-mypy2.4.1").mkdir()
    assert native.current_build() is None
    current = native.source_key(native.current_sources())
    (tmp_path / f"{current}-mypy2.4.1").mkdir()
    assert native.current_build() == tmp_path / f"{current}-mypy2.4.1"


def test_the_finder_serves_its_build_and_nothing_else(tmp_path: Path) -> None:
    build = tmp_path / "key-mypy2.4.1"
    (build / "kvmdbgfs" / "guest").mkdir(parents=True)
    (build / "kvmdbgfs" / "guest" / f"mm{SUFFIX}").write_bytes(b"")
    (build / f"0123abcd__mypyc{SUFFIX}").write_bytes(b"")
    finder = native.NativeFinder(build)
    spec = finder.find_spec("kvmdbgfs.guest.mm")
    assert spec is not None and spec.origin == str(build / "kvmdbgfs" / "guest" / f"mm{SUFFIX}")
    assert finder.find_spec("0123abcd__mypyc") is not None
    assert finder.find_spec("kvmdbgfs.guest.vma") is None and finder.find_spec("kvmdbgfs.guest") is None


def test_without_a_compiler_nothing_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """pip install on a machine with no C compiler: a warning, and every module runs as Python."""
    if os.path.isabs(sysconfig.get_config_var("CC") or "cc"):
        pytest.skip("this Python names its compiler by an absolute path")
    pkg = package(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-bin"))
    monkeypatch.delenv("KVMDBGFS_PURE", raising=False)
    assert native_build.build_or_warn(pkg) is None
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "every module runs as Python" in warning
    assert "no C compiler" in warning or "mypyc) is not installed" in warning
    assert not (pkg / "_native").exists()
    assert "gcc" in [package for _, package in native_build.missing_tools()]  # what make setup then installs


def test_the_compiled_modules_give_what_python_gives() -> None:
    """The bench's scenario, shortened, with and without the build in use: the same tree and MMU digests for every
    rmap design (mypyc compiles the same source; this is what would show a difference in its semantics)."""
    if native.installed is None:
        if os.environ.get("KVMDBGFS_REQUIRE_NATIVE"):
            pytest.fail("KVMDBGFS_REQUIRE_NATIVE is set and no build of these sources is in use (make native)")
        pytest.skip("no build of these sources (make native)")
    digest = Path(__file__).with_name("emulation_digest.py")
    command = [sys.executable, str(digest), "--uptime", "3", "--children", "100"]
    modes = {"compiled": {}, "python": {"KVMDBGFS_PURE": "1"}}
    runs = {  # side by side: the machine has two cores
        mode: subprocess.Popen(command, env={**os.environ, **pure}, stdout=subprocess.PIPE, text=True)
        for mode, pure in modes.items()
    }
    steps = {}
    try:
        for mode, run in runs.items():
            out, _ = run.communicate(timeout=300)
            assert run.returncode == 0
            header, *lines = out.splitlines()
            assert header == f"modules: {native.installed if mode == 'compiled' else 'python'}"
            steps[mode] = [(line.split()[:2], line.split("tree")[1]) for line in lines]  # not the CPU time
    finally:
        for run in runs.values():
            run.kill()
    assert len(steps["compiled"]) == 8
    assert steps["compiled"] == steps["python"]
