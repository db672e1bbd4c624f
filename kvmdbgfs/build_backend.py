"""The build backend of ``pip install`` (PEP 517, pyproject.toml): setuptools', with the compiled modules in the
wheel.

build_wheel has setuptools make the wheel, unpacks it, compiles the package as unpacked, that is as it will be
installed (kvmdbgfs/native_build.py: the build lands in ``kvmdbgfs/_native/<key>``, under the key the installed
files will have), and packs it again tagged for this interpreter and platform (the ``wheel`` tool rewrites the
record). Where nothing can be compiled (no C compiler, KVMDBGFS_PURE=1), the wheel is setuptools' own, pure
Python, and a warning says so. Every other hook is setuptools'.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import build_meta
from setuptools.build_meta import (  # the hooks left to setuptools
    build_editable,
    build_sdist,
    get_requires_for_build_editable,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

from kvmdbgfs.native_build import build_or_warn

__all__ = [
    "build_editable",
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_editable",
    "prepare_metadata_for_build_wheel",
]


def platform_tag() -> str:
    """This interpreter's wheel tag, such as ``cp311-cp311-linux_x86_64`` (an extension's ABI is the
    interpreter's; the platform is the one it was built on, not a manylinux promise)."""
    interpreter = f"cp{sysconfig.get_config_var('py_version_nodot')}"
    abi = "cp" + sysconfig.get_config_var("SOABI").split("-")[1]
    return f"{interpreter}-{abi}-{sysconfig.get_platform().replace('-', '_').replace('.', '_')}"


def wheel_tool(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "wheel", *args], check=True, stdout=subprocess.DEVNULL)


def build_wheel(
    wheel_directory: str, config_settings: dict[str, object] | None = None, metadata_directory: str | None = None
) -> str:
    """PEP 517's build_wheel: setuptools' wheel, with the compiled modules when they can be built."""
    with tempfile.TemporaryDirectory(prefix="kvmdbgfs-wheel-") as tmp:
        pure = build_meta.build_wheel(tmp, config_settings, metadata_directory)
        wheel_tool("unpack", "--dest", tmp, str(Path(tmp) / pure))
        (unpacked,) = (path for path in Path(tmp).iterdir() if path.is_dir())
        if build_or_warn(unpacked / "kvmdbgfs") is None:
            shutil.copy2(Path(tmp) / pure, wheel_directory)
            return pure
        (info,) = unpacked.glob("*.dist-info")
        lines = (info / "WHEEL").read_text().splitlines()
        tagged = [line for line in lines if line and not line.startswith(("Tag:", "Root-Is-Purelib:"))]
        tag = platform_tag()
        (info / "WHEEL").write_text("\n".join([*tagged, "Root-Is-Purelib: false", f"Tag: {tag}", ""]))
        wheel_tool("pack", "--dest-dir", wheel_directory, str(unpacked))
        return f"{unpacked.name}-{tag}.whl"  # the name ``wheel pack`` gives it
