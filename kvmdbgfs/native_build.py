"""``python -m kvmdbgfs.native_build [--check | --missing-packages]`` (``make setup``): build the compiled
modules for the current sources (kvmdbgfs/native.py); --check: only say which build an import would use;
--missing-packages: the Debian packages the compile needs and this machine lacks. The build backend
(kvmdbgfs/build_backend.py) builds the same way into the wheel ``pip install`` makes."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

from kvmdbgfs.native import NATIVE_ROOT, PACKAGE_ROOT, compiled_sources, current_build, project_sources, source_key

# The workloads are not type-checked: no compiled module imports them, and an installed package holds them.
MYPY_CONFIG = """[mypy]
[mypy-mfusepy,tqdm,tqdm.*]
ignore_missing_imports = True
[mypy-kvmdbgfs.workloads,kvmdbgfs.workloads.*]
ignore_missing_imports = True
follow_imports = skip
"""
# mypyc's own command line (python -m mypyc) is this script with PYTHONPATH set to where mypyc is, which
# breaks in pip's build environment (its sitecustomize asserts that no path of it is on sys.path yet).
SETUP = """from setuptools import setup
from mypyc.build import mypycify

setup(name="kvmdbgfs-native", ext_modules=mypycify({sources!r}))
"""


class BuildError(Exception):
    """mypyc or the C compiler failed: the end of what they printed."""


def missing_tools() -> list[tuple[str, str]]:
    """What the compile needs from the system and this machine lacks: (why, the Debian package that brings it),
    for the C compiler and Python's headers (make setup installs the packages, --missing-packages names them)."""
    missing = []
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        missing.append((f"no C compiler ({compiler})", "gcc"))
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        missing.append((f"no Python headers (Python.h in {include})", "python3-dev"))
    return missing


def unbuildable() -> str | None:
    """Why this machine cannot compile the modules (no mypyc, no C compiler, no Python headers), or None."""
    if importlib.util.find_spec("mypyc") is None:
        return "mypy (mypyc) is not installed"
    missing = missing_tools()
    return missing[0][0] if missing else None


def build(package: Path = PACKAGE_ROOT) -> Path:
    """Compile COMPILED of the package at ``package`` with mypyc (in a copy, so that what is compiled is what the
    key names) into its ``_native/<key>-mypy<version>``, unless that build exists; the build's directory.
    Builds of other sources are removed."""
    native_root = package / NATIVE_ROOT.name
    key = source_key(project_sources(package))
    target = native_root / f"{key}-mypy{metadata.version('mypy')}"
    if target.is_dir():
        return target
    with tempfile.TemporaryDirectory(prefix="kvmdbgfs-native-") as tmp:
        work = Path(tmp)
        copy = work / PACKAGE_ROOT.name
        shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__", NATIVE_ROOT.name, "*.so"))
        if source_key(project_sources(copy)) != key:  # an edit while copying
            raise BuildError(f"{package} changed while it was copied for the build")
        (work / "mypy.ini").write_text(MYPY_CONFIG)
        modules = [path.relative_to(work).as_posix() for path in compiled_sources(copy)]
        (work / "setup.py").write_text(SETUP.format(sources=["--config-file", "mypy.ini", *modules]))
        # Not silent for the two minutes it takes (make setup, so a first make run or make test, waits on it).
        print(f"kvmdbgfs.native_build: compiling {len(modules)} modules with mypyc (about 2 minutes on 2 cores; "
              "NATIVE=0 make setup skips it)", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=work, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise BuildError("\n".join((done.stdout + done.stderr).splitlines()[-20:]))
        native_root.mkdir(exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=".staged-", dir=native_root))
        for library in work.rglob(f"*{EXTENSION_SUFFIXES[0]}"):
            if library.relative_to(work).parts[0] != "build":  # mypyc's own copies, in place, are the ones
                (staged / library.relative_to(work)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(library, staged / library.relative_to(work))
        staged.rename(target)  # whole or not at all
    for old in native_root.iterdir():  # builds of earlier sources, and any a failed build left
        if old != target:
            shutil.rmtree(old)
    return target


def build_or_warn(package: Path = PACKAGE_ROOT) -> Path | None:
    """build() where this machine can and KVMDBGFS_PURE is unset; else, or when the build fails, a one-line
    warning on stderr and None (every module runs as Python: slower, the same results)."""
    if os.environ.get("KVMDBGFS_PURE"):
        return None
    reason = unbuildable()
    if reason is None:
        try:
            return build(package)
        except BuildError as error:
            print(error, file=sys.stderr)
            reason = "the build failed (its output is above)"
        except OSError as error:
            reason = f"the build failed ({error})"
    print(f"kvmdbgfs.native_build: {reason}: nothing compiled; every module runs as Python", file=sys.stderr)
    return None


def main() -> None:
    if sys.argv[1:] == ["--check"]:
        print(current_build() or "none: the sources have no build; every module runs as Python")
        return
    if sys.argv[1:] == ["--missing-packages"]:
        print(" ".join(package for _, package in missing_tools()))
        return
    if sys.argv[1:]:
        sys.exit(
            "usage: python -m kvmdbgfs.native_build [--check | --missing-packages]"
            f" (not {' '.join(sys.argv[1:])!r})"
        )
    built = build_or_warn()
    if built is not None:
        print(f"kvmdbgfs.native_build: {built}")


if __name__ == "__main__":
    main()
