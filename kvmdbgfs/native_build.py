"""``python -m kvmdbgfs.native_build [--check]`` (``make setup``): build the compiled modules for the current
sources (kvmdbgfs/native.py); --check: only say which build an import would use."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

from kvmdbgfs.native import NATIVE_ROOT, PACKAGE_ROOT, compiled_sources, current_build, source_key


def build() -> Path:
    """Compile COMPILED with mypyc (in a copy of the package, so that what is compiled is what the key names)
    into ``_native/<key>-mypy<version>``, unless that build exists; the build's directory. Builds of other
    sources are removed."""
    existing = current_build()
    if existing is not None:
        return existing
    mypy_version = metadata.version("mypy")
    with tempfile.TemporaryDirectory(prefix="kvmdbgfs-native-") as tmp:
        work = Path(tmp)
        package = work / PACKAGE_ROOT.name
        shutil.copytree(
            PACKAGE_ROOT, package, ignore=shutil.ignore_patterns("__pycache__", NATIVE_ROOT.name, "*.so")
        )
        target = NATIVE_ROOT / f"{source_key(package)}-mypy{mypy_version}"
        if target.is_dir():
            return target
        (work / "mypy.ini").write_text(
            "[mypy]\npython_version = 3.11\n"
            "[mypy-mfusepy,tqdm,tqdm.*,kvmdbgfs.workloads,kvmdbgfs.workloads.*]\nignore_missing_imports = True\n"
        )
        sources = [path.relative_to(work).as_posix() for path in compiled_sources(package)]
        subprocess.run(
            [sys.executable, "-m", "mypyc", "--config-file", "mypy.ini", *sources],
            cwd=work,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        NATIVE_ROOT.mkdir(exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=".staged-", dir=NATIVE_ROOT))
        for library in work.rglob(f"*{EXTENSION_SUFFIXES[0]}"):
            if library.relative_to(work).parts[0] != "build":  # mypyc's own copies, in place, are the ones
                (staged / library.relative_to(work)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(library, staged / library.relative_to(work))
        staged.rename(target)  # whole or not at all
    for old in NATIVE_ROOT.iterdir():  # builds of earlier sources, and any a failed build left
        if old != target:
            shutil.rmtree(old)
    return target


def main() -> None:
    if sys.argv[1:] == ["--check"]:
        print(current_build() or "none: the sources have no build; every module runs as Python")
        return
    try:
        import mypyc  # noqa: F401
    except ImportError:
        print("kvmdbgfs.native_build: mypy (mypyc) is not installed: nothing compiled; every module runs as Python")
        return
    print(f"kvmdbgfs.native_build: {build()}")


if __name__ == "__main__":
    main()
