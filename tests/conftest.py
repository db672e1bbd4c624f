"""Shared fixtures: a real FUSE mount served by mount.py in a subprocess, and the CLI."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvmdbgfs.control.client import boot_wait, poll_periods
from kvmdbgfs.mountpoint import MountpointError, detach, mounted_paths

REPO = Path(__file__).resolve().parent.parent
MOUNT_PY = REPO / "mount.py"
START_TIMEOUT = 60.0
# FUSE sends RELEASE after close() has returned: what a close frees shows up a moment later.
RELEASE_TIMEOUT = 5.0


def wait_until(condition: Callable[[], Any], timeout: float = RELEASE_TIMEOUT) -> Any:
    """Poll ``condition`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.002)
    return value


def is_mounted(path: Path) -> bool:
    """From /proc/self/mountinfo: os.path.ismount says True on a dead mount too."""
    return os.path.realpath(path) in mounted_paths()


def force_unmount(path: Path) -> None:
    """fusermount -u, then -u -z when busy (the same detach mount.py does for a stale mount)."""
    if is_mounted(path):
        with contextlib.suppress(MountpointError):
            detach(str(path))


@dataclass
class Mount:
    """A running mount.py: its mountpoint, its process and its control socket."""

    path: Path
    process: subprocess.Popen
    control: Path
    env: dict[str, str]
    log: Path

    def stderr(self) -> str:
        """What mount.py has written to its stderr so far."""
        return self.log.read_text()

    def cli_command(self, *args: str) -> list[str]:
        """The command line of the `kvmdbgfs` CLI against this mount."""
        return [sys.executable, "-m", "kvmdbgfs.cli", "-m", str(self.path), *args]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run the `kvmdbgfs` CLI against this mount."""
        result = subprocess.run(self.cli_command(*args), capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"kvmdbgfs {' '.join(args)} failed: {result.stderr}")
        return result

    def spawn_cli(self, *args: str) -> subprocess.Popen:
        """Start the `kvmdbgfs` CLI against this mount without waiting for it (text pipes for its output)."""
        return subprocess.Popen(
            self.cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env
        )

    def create_vm(self, *args: str) -> str:
        return self.cli("vm", "create", *args).stdout.strip()

    def destroy_vm(self, name: str) -> None:
        self.cli("vm", "destroy", name)

    def sh(self, script: str) -> str:
        """Run a shell pipeline in the mountpoint; return its stdout."""
        result = subprocess.run(
            ["bash", "-c", script], cwd=self.path, capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise AssertionError(f"{script!r} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        force_unmount(self.path)
        return self.process.returncode


def mount_env(runtime: Path) -> dict[str, str]:
    """The environment tests run mount.py and the CLI in: ``runtime`` as $XDG_RUNTIME_DIR, this checkout importable."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, XDG_RUNTIME_DIR=str(runtime), PYTHONPATH=pythonpath)


def spawn_mount(tmp_path: Path, *args: str, control: Path | None = None) -> Mount:
    """Start mount.py on ``tmp_path``/mnt, its socket at ``control`` (default ``tmp_path``/control.sock), without
    waiting for it. Tests run a manual clock (deterministic trees) unless they ask for ``--clock realtime``."""
    if "--clock" not in args:
        args = (*args, "--clock", "manual")
    mountpoint = tmp_path / "mnt"
    with contextlib.suppress(FileExistsError):
        mountpoint.mkdir()
    control = control or tmp_path / "control.sock"
    log = tmp_path / "mount.log"
    env = mount_env(tmp_path)
    process = subprocess.Popen(
        [sys.executable, str(MOUNT_PY), str(mountpoint), "--control", str(control), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    return Mount(mountpoint, process, control, env, log)


def wait_served(mount: Mount, booted: bool = True) -> Mount:
    """Wait until a file inside the mount can be stat'ed and its control socket exists, and with ``booted``
    until `status` says the scenario's guests have booted (they boot while the tree is served)."""
    deadline = time.monotonic() + START_TIMEOUT
    periods = poll_periods()
    while time.monotonic() < deadline:
        if mount.process.poll() is not None:
            raise AssertionError(f"mount.py exited with {mount.process.returncode}: {mount.stderr()}")
        if is_mounted(mount.path) and mount.control.exists():
            try:
                os.stat(mount.path / "exits")
                if not booted or boot_wait(mount.control, max(0.0, deadline - time.monotonic()), timeout=10)["booted"]:
                    return mount
            except OSError:
                pass
        time.sleep(next(periods))
    mount.stop()
    raise AssertionError("mount.py did not come up in time")


def start_mount(tmp_path: Path, *args: str, control: Path | None = None, booted: bool = True) -> Mount:
    """Start mount.py (see spawn_mount) and wait until it serves (and its guests have booted)."""
    return wait_served(spawn_mount(tmp_path, *args, control=control), booted)


@contextlib.contextmanager
def mount_with_scenario(tmp_path_factory: pytest.TempPathFactory, text: str, *args: str) -> Iterator[Mount]:
    """mount.py serving the scenario ``text`` (TOML) for a module's tests; stopped and unmounted at the end."""
    directory = tmp_path_factory.mktemp("mount")
    scenario = directory / "scenario.toml"
    scenario.write_text(text)
    running = start_mount(directory, "--scenario", str(scenario), *args)
    try:
        yield running
    finally:
        running.stop()


def assert_one_error_line(result: subprocess.CompletedProcess, status: int, message: str) -> None:
    """Exit ``status``, nothing on stdout, one line on stderr: ``message``, or starting with it if it ends in '…'."""
    assert (result.returncode, result.stdout) == (status, ""), result
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    line = result.stderr[:-1]
    if message.endswith("…"):
        assert line.startswith(message[:-1]), line
    else:
        assert line == message


@pytest.fixture(scope="session", autouse=True)
def boot_cache_of_the_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The mounts of a test run share a boot cache of their own (never the user's): a scenario's guests are
    emulated once per run, then restored."""
    directory = tmp_path_factory.mktemp("boot-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVMDBGFS_CACHE_DIR", str(directory))
        yield directory


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator:
    """Start mounts with given mount.py arguments; every one is stopped and unmounted afterwards."""
    mounts: list[Mount] = []

    def factory(*args: str) -> Mount:
        directory = tmp_path / f"m{len(mounts)}"
        directory.mkdir()
        mount = start_mount(directory, *args)
        mounts.append(mount)
        return mount

    yield factory
    for mount in mounts:
        mount.stop()


@pytest.fixture
def empty_mount(mount_factory) -> Mount:
    """A mount with no VMs (the latest profile)."""
    return mount_factory("--scenario", "empty")
