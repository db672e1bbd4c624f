"""Real FUSE mounts for the benches: mount.py serving a scenario, and the bare mfusepy filesystem
(kvmdbgfs.bench.bare_fs); each started as a process, up once a file inside can be stat'ed, always stopped and
unmounted."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmdbgfs.control.client import boot_wait, request
from kvmdbgfs.daemon import kill
from kvmdbgfs.mountpoint import MountpointError, detach, mounted_paths

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S, STOP_TIMEOUT_S = 300.0, 20.0


@dataclass
class Served:
    """A running server: its mountpoint, control socket (mount.py only), process, environment, when it was
    started (time.monotonic()) and the seconds from then until a file inside could be stat'ed."""

    path: Path
    control: Path
    process: subprocess.Popen
    env: dict[str, str]
    started: float
    start_seconds: float = 0.0

    def vms(self) -> list[dict[str, Any]]:
        return request(self.control, "vm.list")


def is_mounted(path: Path) -> bool:
    """From /proc/self/mountinfo: os.path.ismount says True on a dead mount too."""
    return os.path.realpath(path) in mounted_paths()


def wait_for(condition: Callable[[], object], timeout: float, what: str,
             periods: Iterable[float] = itertools.repeat(0.01)) -> None:
    """Poll ``condition``, sleeping each of ``periods`` in turn (a control request's condition: poll_periods(),
    since each request makes the guests yield); TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for period in periods:
        if condition():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(period)


def wait_booted(served: Served) -> None:
    """The scenario's guests have booted (`boot.wait`: answered as the boot ends)."""
    if not boot_wait(served.control, START_TIMEOUT_S)["booted"]:
        raise TimeoutError(f"waited {START_TIMEOUT_S:.0f} s for the scenario's guests to boot")


def read_file(path: Path | str) -> bytes:
    """open + read to EOF + close, unbuffered, as a monitoring tool in Python reads a debugfs file."""
    with open(path, "rb", buffering=0) as handle:
        return handle.readall()


@contextlib.contextmanager
def _serving_process(name: str, command: list[str], directory: Path, probe: str, control: Path,
                     env: dict[str, str]) -> Iterator[Served]:
    """Run ``command`` + a mountpoint, ``directory``/mnt, until ``probe`` inside can be stat'ed; ``env`` is
    added to the environment."""
    mountpoint = directory / "mnt"
    mountpoint.mkdir()
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, XDG_RUNTIME_DIR=str(directory), PYTHONPATH=pythonpath, **env)
    with open(directory / "server.log", "w") as log:
        start = time.monotonic()
        process = subprocess.Popen([*command, str(mountpoint)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                   stderr=log)
    try:
        served = Served(mountpoint, control, process, env, start)
        wait_for(lambda: process.poll() is not None or (is_mounted(mountpoint) and os.path.exists(mountpoint / probe)),
                 START_TIMEOUT_S, f"{name} to come up")
        served.start_seconds = time.monotonic() - start
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}: {(directory / 'server.log').read_text()}")
        yield served
    finally:
        kill(process, STOP_TIMEOUT_S)
        if is_mounted(mountpoint):
            with contextlib.suppress(MountpointError):
                detach(str(mountpoint))


@contextlib.contextmanager
def mounted(
    scenario: str, clock: str = "realtime", env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> Iterator[Served]:
    """mount.py (as tests/conftest.py starts it) serving ``scenario``, a built-in name or TOML text, with
    ``clock``, further ``args``, and ``env`` added to its environment; up once a file inside can be stat'ed."""
    with tempfile.TemporaryDirectory(prefix="kvmdbgfs-bench-") as tmp:
        directory = Path(tmp)
        if "\n" in scenario:
            (directory / "scenario.toml").write_text(scenario)
            scenario = str(directory / "scenario.toml")
        control = directory / "control.sock"
        command = [sys.executable, str(REPO / "mount.py"), "--control", str(control), "--scenario", scenario,
                   "--clock", clock, *args]
        with _serving_process("mount.py", command, directory, "exits", control, env or {}) as served:
            wait_for(control.exists, STOP_TIMEOUT_S, "the control socket")
            yield served


@contextlib.contextmanager
def bare_mounted(blob_size: int = 0) -> Iterator[Served]:
    """The bare mfusepy filesystem (kvmdbgfs.bench.bare_fs), its ``/blob`` ``blob_size`` bytes long."""
    with tempfile.TemporaryDirectory(prefix="kvmdbgfs-bench-bare-") as tmp:
        command = [sys.executable, "-m", "kvmdbgfs.bench.bare_fs", "--blob-size", str(blob_size)]
        with _serving_process("bare_fs", command, Path(tmp), "vm/value", Path(tmp) / "no-control", {}) as served:
            yield served
