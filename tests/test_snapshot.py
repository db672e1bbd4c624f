"""`kvmdbgfs snapshot`: the tree as plain files and as one archive, read at one instant of host time.

The same scenario gives the same archive, byte for byte, whether it is built in-process (`--scenario`, two
runs) or served by a mount under a manual clock; what the snapshot holds is what `cat` reads through the
mount; the top-level files are the sums of the per-VM files even while a workload changes them.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, mount_with_scenario

from kvmdbgfs.control.client import request
from kvmdbgfs.snapshot import FORMAT, Snapshot, parse_archive

SCENARIO = """\
seed = 9
[[vm]]
memory = "256M"
vcpus = 2
mmu = "shadow"
workload = "idle"
settings = { uptime = 0, workers = 0, logins = 1 }
[[vm]]
memory = "256M"
vcpus = 1
mmu = "tdp"
"""


def snapshot_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "kvmdbgfs", "snapshot", *map(str, args)]


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scenario") / "two_vms.toml"
    path.write_text(SCENARIO)
    return path


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mount_with_scenario(tmp_path_factory, SCENARIO) as running:
        yield running


@pytest.fixture(scope="module")
def scenario_archives(scenario_file: Path, tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Two archives of the scenario, built in two processes at once."""
    out = tmp_path_factory.mktemp("archives")
    runs = [
        subprocess.Popen(
            snapshot_command("--scenario", scenario_file, "--archive", out / f"{n}.txt"), stderr=subprocess.PIPE
        )
        for n in range(2)
    ]
    for run in runs:
        assert run.wait(timeout=180) == 0, run.stderr.read() if run.stderr else ""
    return [(out / f"{n}.txt").read_bytes() for n in range(2)]


def sums_hold(files: dict[str, bytes]) -> None:
    """Every top-level stat file is the sum of the VM directories' files of that name (histograms bucket by
    bucket)."""
    vms = sorted({path.split("/")[0] for path in files if "/" in path})
    assert vms
    checked = 0
    for name, content in files.items():
        if "/" in name or not all(f"{vm}/{name}" in files for vm in vms):
            continue
        per_vm = [[int(word) for word in files[f"{vm}/{name}"].split()] for vm in vms]
        assert [int(word) for word in content.split()] == [sum(column) for column in zip(*per_vm)], name
        checked += 1
    assert checked > 30


def test_the_same_scenario_gives_the_same_archive(scenario_archives: list[bytes]) -> None:
    first, second = scenario_archives
    assert first == second
    snapshot = parse_archive(first)
    assert first.startswith(f"{FORMAT}\nkernel: latest\nseed: 9\nclock: manual\n".encode())
    assert snapshot.header["versions"].startswith("kvmdbgfs 0.1.0; numpy ")
    paths = [entry.path for entry in snapshot.entries]
    assert paths == sorted(paths) and int(snapshot.header["entries"]) == len(paths)
    files = {entry.path: entry.content for entry in snapshot.entries if entry.kind == "file"}
    assert int(files["exits"]) > 0  # the idle guest booted
    sums_hold(files)


def test_a_mount_under_a_manual_clock_gives_the_scenario_archive(
    mount: Mount, scenario_archives: list[bytes], tmp_path: Path
) -> None:
    archive, directory = tmp_path / "mount.txt", tmp_path / "tree"
    result = subprocess.run(
        snapshot_command(mount.path, directory, "--archive", archive),
        env=mount.env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert archive.read_bytes() == scenario_archives[0]
    # The directory holds what `cat` reads through the mount, file for file.
    written = sorted(str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file())
    through_fuse = mount.sh("find . -type f | sed 's|^./||' | sort").split()
    assert written == through_fuse
    for name in written:
        assert (directory / name).read_bytes() == (mount.path / name).read_bytes(), name
    assert oct((directory / "blocking").stat().st_mode & 0o777) == "0o444"


def test_top_level_sums_hold_while_a_workload_runs(mount: Mount) -> None:
    (vm,) = [line.split()[0] for line in mount.cli("vm", "list").stdout.splitlines()[1:] if "shadow" in line]
    mount.cli("run", "rmap_fork", "--vm", vm, "--set", "children=100", "--detach")
    try:
        for _ in range(3):
            snapshot = parse_archive(mount.cli("snapshot", "--archive", "-").stdout.encode())
            sums_hold({entry.path: entry.content for entry in snapshot.entries if entry.kind == "file"})
    finally:
        mount.cli("cancel", "--vm", vm, check=False)


def test_a_snapshot_never_catches_a_vm_half_made_or_half_gone(mount: Mount) -> None:
    """VMs created and destroyed through the control socket while snapshots are taken: each snapshot has every
    VM whole (its vCPU directories there) and its sums right."""
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            name = request(mount.control, "vm.create", memory="256M", vcpus=2)["name"]
            request(mount.control, "vm.destroy", name=name)

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        for _ in range(10):
            snapshot = Snapshot.from_wire(request(mount.control, "snapshot"))
            files = {entry.path: entry.content for entry in snapshot.entries if entry.kind == "file"}
            for vm in {path.split("/")[0] for path in files if "/" in path}:
                assert {f"{vm}/vcpu0/pid", f"{vm}/exits"} <= files.keys(), vm
            sums_hold(files)
    finally:
        stop.set()
        churner.join(timeout=60)
    assert not churner.is_alive()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--archive", "-"], "give a mountpoint (or --scenario) and a directory to write, or --archive FILE"),
        (["--scenario", "empty"], "nothing to write: give a directory or --archive FILE"),
        (["--scenario", "nope", "--archive", "-"], "scenario 'nope': no such file (built-in: default, empty)"),
    ],
)
def test_bad_arguments_get_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = subprocess.run(
        snapshot_command(*args), capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"kvmdbgfs: error: {message}\n")
