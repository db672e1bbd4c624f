"""mount.py as a user runs it: refusals before anything is mounted, clean exits on signals, stale-mount recovery.

Every refusal is one line on stderr (``mount.py: error: ...``) and exit
status 2, with nothing mounted (checked in /proc/self/mountinfo), no control
socket left behind and the mountpoint as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MOUNT_PY, REPO, Mount, force_unmount, is_mounted, spawn_mount, start_mount, wait_served
from conftest import assert_one_error_line

from kvmdbgfs.control.client import RequestError, request

EXIT_USAGE = 2
REFUSAL_TIMEOUT = 30


def mount_count(path: Path) -> int:
    """How many mounts sit on ``path`` (is_mounted() only says whether any does)."""
    target = str(path.resolve())
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        return sum(line.split()[4] == target for line in handle)


def run_mount_py(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """mount.py with start_mount()'s environment, expected to exit by itself."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path), PYTHONPATH=pythonpath)
    command = [sys.executable, str(MOUNT_PY), *args]
    try:
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=REFUSAL_TIMEOUT)
    except subprocess.TimeoutExpired:
        for arg in args:
            if Path(arg).is_dir():
                force_unmount(Path(arg))
        pytest.fail(f"mount.py {' '.join(args)} did not exit: it mounted something it should have refused")


def write_scenario(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return path


def listing(path: Path) -> list[str] | str:
    """What is at ``path`` now: a directory's names, or what else it is."""
    if path.is_dir():
        return sorted(os.listdir(path))
    return "file" if path.is_file() else "missing"


# Each case: (prepare(tmp_path) -> (mountpoint, extra arguments), expected line or prefix ending in '…').
def _empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "mnt").mkdir()
    return tmp_path / "mnt"


def _regular_file(tmp_path: Path) -> Path:
    (tmp_path / "mnt").write_text("not a directory\n")
    return tmp_path / "mnt"


def _non_empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt" / "keep").write_text("x")
    return tmp_path / "mnt"


def _fifo(tmp: Path) -> str:
    """A FIFO with no writer: opening it for reading the usual way would block forever."""
    path = tmp / "scenario.fifo"
    os.mkfifo(path)
    return str(path)


def _with_scenario(text: str) -> Callable[[Path], tuple[Path, list[str]]]:
    return lambda tmp: (_empty_dir(tmp), ["--scenario", str(write_scenario(tmp, text))])


REFUSALS: dict[str, tuple[Callable[[Path], tuple[Path, list[str]]], str]] = {
    "missing-path": (lambda tmp: (tmp / "mnt", []), "mount.py: error: {mnt}: no such file or directory"),
    "regular-file": (lambda tmp: (_regular_file(tmp), []), "mount.py: error: {mnt}: not a directory"),
    "non-empty-directory": (lambda tmp: (_non_empty_dir(tmp), []), "mount.py: error: {mnt}: not empty"),
    "unknown-kernel": (
        lambda tmp: (_empty_dir(tmp), ["--kernel", "v9"]),
        "mount.py: error: unknown kernel profile 'v9' (known: …",
    ),
    "missing-scenario": (
        lambda tmp: (_empty_dir(tmp), ["--scenario", str(tmp / "absent.toml")]),
        "mount.py: error: scenario '{tmp}/absent.toml': no such file (built-in: default, empty)",
    ),
    "malformed-scenario": (
        _with_scenario('[[vm]\nmemory = "256M"\n'),
        "mount.py: error: scenario '{tmp}/scenario.toml': …",
    ),
    "unknown-scenario-key": (
        _with_scenario('seed = 1\nvms = 2\n'),
        "mount.py: error: scenario '{tmp}/scenario.toml': unknown keys ['vms']",
    ),
    "bad-vm-mmu": (
        _with_scenario('[[vm]]\nmemory = "256M"\nmmu = "ept"\n'),
        "mount.py: error: scenario vm 0: unknown MMU mode 'ept' (known: shadow, tdp-legacy, tdp)",
    ),
    "bad-second-vm": (
        _with_scenario('[[vm]]\nmemory = "256M"\n[[vm]]\nmemory = "1M"\n'),
        "mount.py: error: scenario vm 1: memory must be a multiple of 4 KiB between 64 MiB and 64 GiB",
    ),
    "bad-vm-kernel-type": (
        _with_scenario('[[vm]]\nmemory = "256M"\nkernel = 515\n'),
        "mount.py: error: scenario vm 0: …",
    ),
    "float-where-an-integer-is-asked": (
        _with_scenario('[[vm]]\nmemory = "256M"\nvcpus = 2.0\n'),
        "mount.py: error: scenario vm 0: vcpus has the wrong type: 2.0",
    ),
    "boolean-seed": (
        _with_scenario("seed = true\n"),
        "mount.py: error: scenario '{tmp}/scenario.toml': seed must be a non-negative integer",
    ),
    "float-setting": (
        _with_scenario('[[vm]]\nmemory = "256M"\nworkload = "idle"\nsettings = { uptime = 1.5 }\n'),
        "mount.py: error: scenario vm 0: uptime: not a whole number: 1.5",
    ),
    "unicode-digits-in-a-size": (
        _with_scenario('[[vm]]\nmemory = "\u0666G"\n'),
        "mount.py: error: scenario vm 0: bad memory size '\u0666G' (examples: 6G, 512M)",
    ),
    "fifo-as-scenario": (
        lambda tmp: (_empty_dir(tmp), ["--scenario", _fifo(tmp)]),
        "mount.py: error: scenario '{tmp}/scenario.fifo': not a regular file",
    ),
    "device-as-scenario": (
        lambda tmp: (_empty_dir(tmp), ["--scenario", "/dev/zero"]),
        "mount.py: error: scenario '/dev/zero': not a regular file",
    ),
    "negative-boot-workers": (
        lambda tmp: (_empty_dir(tmp), ["--boot-workers", "-1"]),
        "mount.py: error: argument --boot-workers: invalid processes value: '-1'",
    ),
    "control-in-missing-directory": (
        lambda tmp: (_empty_dir(tmp), ["--control", str(tmp / "no" / "such" / "dir.sock")]),
        "mount.py: error: control socket {tmp}/no/such/dir.sock: …",
    ),
}


@pytest.mark.parametrize("prepare, message", REFUSALS.values(), ids=REFUSALS.keys())
def test_refusal_mounts_nothing(tmp_path: Path, prepare, message: str) -> None:
    mountpoint, extra = prepare(tmp_path)
    before = listing(mountpoint)
    result = run_mount_py(tmp_path, str(mountpoint), *extra)
    assert_one_error_line(result, EXIT_USAGE, message.format(mnt=mountpoint, tmp=tmp_path))
    assert not is_mounted(mountpoint)
    assert listing(mountpoint) == before
    assert listing(tmp_path / "kvmdbgfs") in ("missing", [])  # no control socket, no pointer file


def test_no_mountpoint_argument(tmp_path: Path) -> None:
    message = "mount.py: error: the following arguments are required: mountpoint"
    assert_one_error_line(run_mount_py(tmp_path), EXIT_USAGE, message)


def test_already_mounted(tmp_path: Path, mount_factory) -> None:
    """A running mount's path is refused; that mount is not stacked on and goes on serving."""
    running = mount_factory("--scenario", "empty")
    result = run_mount_py(tmp_path, str(running.path), "--control", str(tmp_path / "second.sock"))
    assert_one_error_line(result, EXIT_USAGE, f"mount.py: error: {running.path}: already mounted")
    assert mount_count(running.path) == 1
    assert (running.path / "exits").read_text() == "0\n"
    assert running.process.poll() is None and running.control.exists()


def stopped_cleanly(mount: Mount, sig: int) -> str:
    """Send ``sig``; the server must exit 0 with its mount and control socket gone. Returns its stderr."""
    mount.process.send_signal(sig)
    try:
        status = mount.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mount.py did not exit on {signal.Signals(sig).name}")
    stderr = mount.stderr()
    assert status == 0, stderr
    assert not is_mounted(mount.path)
    assert os.listdir(mount.path) == []
    assert not mount.control.exists()
    assert "Traceback" not in stderr and "error" not in stderr, stderr
    return stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_unmounts_and_exits_0(mount_factory, sig: int) -> None:
    mount = mount_factory("--scenario", "empty")
    assert (mount.path / "exits").read_text() == "0\n"
    stderr = stopped_cleanly(mount, sig)
    assert f"mount.py: serving {mount.path.resolve()} (latest, manual clock; no VMs); Ctrl-C to unmount\n" in stderr


def test_signal_with_a_file_open(mount_factory) -> None:
    """Ctrl-C while a reader holds a file (tail -f): still exit 0 and unmounted; the reader gets ENOTCONN."""
    mount = mount_factory("--scenario", "empty")
    fd = os.open(mount.path / "exits", os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"0\n"
        stopped_cleanly(mount, signal.SIGINT)
        with pytest.raises(OSError) as info:
            os.pread(fd, 100, 0)
        assert info.value.errno == errno.ENOTCONN
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # the flush cannot reach a server that is gone


def test_stale_mount_is_detached_and_reused(mount_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGKILLed server leaves ENOTCONN; the next mount.py detaches it, says so, and serves."""
    killed = mount_factory("--scenario", "empty")
    killed.process.kill()
    killed.process.wait()
    assert is_mounted(killed.path)
    with pytest.raises(OSError) as info:
        os.stat(killed.path)
    assert info.value.errno == errno.ENOTCONN

    scenario = write_scenario(killed.path.parent, '[[vm]]\nmemory = "128M"\nvcpus = 1\n')
    with monkeypatch.context() as patch:
        # start_mount() makes the mountpoint with Path.mkdir(exist_ok=True), whose
        # existence check stats it: ENOTCONN on a stale mount. It exists already.
        patch.setattr(Path, "mkdir", lambda self, *args, **kwargs: None)
        reused = start_mount(killed.path.parent, "--scenario", str(scenario))
    try:
        assert mount_count(reused.path) == 1
        (name,) = [vm for vm in os.listdir(reused.path) if "-" in vm]
        assert (reused.path / name / "vcpu0" / "tsc-scaling-ratio-frac-bits").read_text() == "48\n"
        assert reused.cli("vm", "list", "--json").returncode == 0
        stderr = stopped_cleanly(reused, signal.SIGTERM)
    finally:
        reused.stop()  # nothing left to do once it exited cleanly
    assert f"mount.py: {killed.path}: detached a stale mount left by a server that is gone\n" in stderr


def test_status_waits_for_the_boot(tmp_path: Path) -> None:
    """`status --wait-booted` (one `boot.wait` request) answers once the guests have booted; a bad bound is one
    line and changes nothing."""
    scenario = write_scenario(tmp_path, '[[vm]]\nmemory = "256M"\nvcpus = 2\nworkload = "idle"\n')
    mount = wait_served(spawn_mount(tmp_path, "--scenario", str(scenario), "--no-cache"), booted=False)
    try:
        waited = mount.cli("status", "--wait-booted", "120")
        assert "booted: True\nbooting: []\nboot_error: None\n" in waited.stdout and waited.stderr == ""
        too_long = mount.cli("status", "--wait-booted", "3601", check=False)
        assert_one_error_line(too_long, 1, "kvmdbgfs: error: seconds must be a number from 0 to 3600")
        for bad in (-1, True, "soon", None):
            with pytest.raises(RequestError, match="seconds must be a number from 0 to 3600"):
                request(mount.control, "boot.wait", seconds=bad)
        assert request(mount.control, "status", timeout=30)["booted"]
    finally:
        mount.stop()


def test_the_tree_is_served_while_the_default_scenario_boots_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    """The default scenario's guests boot while the tree is served (issue 14): `ls` works and `status` says which
    guests still boot; SIGINT then unmounts and exits 0 (the boots end at their next safe point or finish)."""
    mount = wait_served(spawn_mount(tmp_path, "--scenario", "default", "--no-cache"), booted=False)
    try:
        listing = subprocess.run(["ls", str(mount.path)], capture_output=True, text=True, timeout=30, check=True)
        status = request(mount.control, "status", timeout=30)
        assert not status["booted"] and status["booting"], status
        assert set(status["booting"]) <= set(listing.stdout.split())
        waited = mount.cli("status", "--wait-booted", "0.01", check=False)
        assert_one_error_line(waited, 1, "kvmdbgfs: error: the scenario's guests have not booted within 0.01 s")
        mount.process.send_signal(signal.SIGINT)
        assert mount.process.wait(timeout=90) == 0
    finally:
        mount.stop()
    assert "Traceback" not in mount.stderr()
    assert not mount.control.exists() and not is_mounted(mount.path)
