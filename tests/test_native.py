"""kvmdbgfs/native.py: a build of the compiled modules is used only for the sources it was built from."""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from kvmdbgfs import native

SUFFIX = EXTENSION_SUFFIXES[0]


def package(root: Path) -> Path:
    (root / "kvmdbgfs" / "guest").mkdir(parents=True)
    (root / "kvmdbgfs" / "__init__.py").write_text("")
    (root / "kvmdbgfs" / "guest" / "mm.py").write_text("X = 1\n")
    return root / "kvmdbgfs"


def test_an_edit_to_any_source_changes_the_key(tmp_path: Path) -> None:
    pkg = package(tmp_path)
    key = native.source_key(pkg)
    assert native.source_key(pkg) == key
    (pkg / "guest" / "mm.py").write_text("X = 2\n")
    edited = native.source_key(pkg)
    assert edited != key
    (pkg / "other.py").write_text("")  # not a compiled module: the key still moves
    assert native.source_key(pkg) not in (key, edited)


def test_a_build_of_other_sources_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "NATIVE_ROOT", tmp_path)
    (tmp_path / "0123456789abcdef0123456789abcdef-mypy2.4.1").mkdir()
    assert native.current_build() is None
    (tmp_path / f"{native.source_key()}-mypy2.4.1").mkdir()
    assert native.current_build() == tmp_path / f"{native.source_key()}-mypy2.4.1"


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
