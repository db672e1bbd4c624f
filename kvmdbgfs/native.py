"""The hot modules compiled by mypyc: built by ``python -m kvmdbgfs.native_build`` (``make setup``), used only while
they are what the sources say.

mypyc compiles the unchanged sources of COMPILED (the shadow MMU and the guest OS model) to C extensions, one
implementation of the logic (issue 14). A build is kept in ``_native/<key>-mypy<version>/`` beside this file;
``key`` is a digest of the Python the build is for and of every Python file of the package (the workloads
aside), as the build saw it. At import, kvmdbgfs/__init__.py calls install(): when the directory of the current
key exists, a finder ahead of the usual ones loads each compiled module from it; otherwise nothing is installed
and every module is its source. So an edit to any file of the package (compiled or not: mypyc inlines Final
constants and relies on the types of what a compiled module imports) makes the next start pure until the next
build, and the build is used all or nothing: mypyc links the compiled modules into one library
(``<hash>__mypyc``), so a mix of compiled modules and newer sources would be unsound. KVMDBGFS_PURE=1 in the
environment leaves the build unused.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from collections.abc import Sequence
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, ModuleSpec
from pathlib import Path
from types import ModuleType

PACKAGE_ROOT = Path(__file__).resolve().parent
NATIVE_ROOT = PACKAGE_ROOT / "_native"
WORKLOADS = "workloads"
installed: Path | None = None  # the build install() put in use (the boot cache keys its snapshots by it)

# Compiled: every module of these folders but their __init__s and the modules below.
COMPILED_DIRS = ("arch/x86/mmu", "guest")
NOT_COMPILED = frozenset(
    {
        # A @dataclass whose field type is imported only under TYPE_CHECKING from a module in an import cycle:
        # the compiled module crashes at import (a mypyc bug).
        "guest/process.py",
        "guest/userspace.py",
    }
)


def compiled_sources(root: Path = PACKAGE_ROOT) -> list[Path]:
    """The files COMPILED names under the package directory ``root``."""
    return [
        path
        for folder in COMPILED_DIRS
        for path in sorted((root / folder).glob("*.py"))
        if path.name != "__init__.py" and path.relative_to(root).as_posix() not in NOT_COMPILED
    ]


def project_sources(root: Path = PACKAGE_ROOT) -> dict[str, bytes]:
    """The SHA-256 of every Python file of the project whose package is ``root``, by the file's path in the
    installed package: workloads/, which a checkout keeps beside the package and pip installs inside it, is
    ``kvmdbgfs/workloads/`` in both. The builds in _native are not sources."""
    folders = [(root, root.name)]
    if (root.parent / WORKLOADS).is_dir() and not (root / WORKLOADS).is_dir():
        folders.append((root.parent / WORKLOADS, f"{root.name}/{WORKLOADS}"))
    found = {
        f"{name}/{path.relative_to(folder).as_posix()}": hashlib.sha256(path.read_bytes()).digest()
        for folder, name in folders
        for path in folder.rglob("*.py")
        if NATIVE_ROOT.name not in path.relative_to(folder).parts
    }
    return dict(sorted(found.items()))


@functools.cache
def current_sources() -> dict[str, bytes]:
    """project_sources() of this package, read once per process (the build's key and the boot cache's)."""
    return project_sources()


def sources_digest(sources: dict[str, bytes]) -> str:
    """One digest of the files of ``sources``, paths and contents."""
    digest = hashlib.sha256()
    for path, content in sources.items():
        digest.update(path.encode() + b"\0" + content)
    return digest.hexdigest()


def source_key(sources: dict[str, bytes]) -> str:
    """The digest a build of ``sources`` is kept under: this interpreter's version and ABI, and every file of the
    package but the workloads (which no compiled module imports, and which sit elsewhere in a checkout)."""
    package = {path: content for path, content in sources.items() if path.split("/")[1] != WORKLOADS}
    interpreter = f"{sys.implementation.cache_tag} {sys.version} {EXTENSION_SUFFIXES[0]}"
    return hashlib.sha256(f"{interpreter} {sources_digest(package)}".encode()).hexdigest()[:32]


def module_name(path: Path, build: Path) -> str:
    """``kvmdbgfs/guest/mm.cpython-311-x86_64-linux-gnu.so`` in ``build`` -> ``kvmdbgfs.guest.mm``."""
    parts = path.relative_to(build).parts
    return ".".join((*parts[:-1], parts[-1].split(".", 1)[0]))


class NativeFinder:
    """Finds the modules of one build (the compiled modules and mypyc's shared library), and only those. (An
    importlib.abc.MetaPathFinder in all but name: importing importlib.abc costs 9 ms of every start.)"""

    def __init__(self, build: Path) -> None:
        self.build = build
        self.files = {module_name(path, build): path for path in build.rglob(f"*{EXTENSION_SUFFIXES[0]}")}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        spec = ModuleSpec(fullname, ExtensionFileLoader(fullname, str(file)), origin=str(file))
        spec.has_location = True
        return spec


def current_build() -> Path | None:
    """The build of the package as its files are now, if there is one."""
    if not NATIVE_ROOT.is_dir():
        return None
    key = source_key(current_sources())
    return next(iter(sorted(NATIVE_ROOT.glob(f"{key}-mypy*"))), None)


def install() -> Path | None:
    """Put the current build's finder first on sys.meta_path (see the module's docstring); the build used."""
    global installed
    if os.environ.get("KVMDBGFS_PURE") or installed is not None:
        return installed
    installed = current_build()
    if installed is not None:
        sys.meta_path.insert(0, NativeFinder(installed))
    return installed
