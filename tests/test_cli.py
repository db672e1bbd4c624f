"""The `kvmdbgfs` CLI and the control socket against a real mount.

What works prints exactly what it says (a new VM's name, a table, JSON,
status lines) and shows in the tree at once. What is refused prints one line
on stderr starting ``kvmdbgfs: error:`` and exits 2 (usage, argparse) or 1
(refused by the server, or no server); the server's state (`vm.list` and the
tree's paths) is unchanged and the server still answers. Malformed raw
requests get ``{"ok": false, "error": ...}`` on the same connection, which
goes on answering.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, assert_one_error_line, mount_with_scenario, wait_until
from expected_files import per_vm_files

from kvmdbgfs.control.client import request

SCENARIO = """\
seed = 11
[[vm]]
memory = "256M"
vcpus = 1
mmu = "shadow"
"""
ERROR = "kvmdbgfs: error: "
MISSING_VM = "4194305-10"  # above pid_max: never a VM's name


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mount_with_scenario(tmp_path_factory, SCENARIO) as running:
        yield running


def server_state(mount: Mount) -> tuple[list, list[str]]:
    """What the server holds: its VM list and every path of its tree (raises if it does not answer)."""
    paths = sorted(
        os.path.relpath(os.path.join(directory, name), mount.path)
        for directory, subdirs, files in os.walk(mount.path)
        for name in subdirs + files
    )
    return request(mount.control, "vm.list"), paths


def vm_entry(mount: Mount, name: str) -> dict | None:
    return next((vm for vm in request(mount.control, "vm.list") if vm["name"] == name), None)


def files_of(mount: Mount, name: str) -> list[str]:
    top = mount.path / name
    return sorted(str(path.relative_to(top)) for path in top.rglob("*") if path.is_file())


def run_cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    """The CLI exactly as given (Mount.cli always adds -m)."""
    command = [sys.executable, "-m", "kvmdbgfs.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def new_vm(mount: Mount) -> Iterator:
    """``new_vm(*options)`` creates a VM with the CLI; whatever is left is destroyed afterwards."""
    created: list[str] = []

    def create(*options: str) -> str:
        result = mount.cli("vm", "create", *options)
        assert re.fullmatch(r"[1-9][0-9]*-[1-9][0-9]+\n", result.stdout) and result.stderr == "", result
        created.append(result.stdout.strip())
        return created[-1]

    yield create
    for name in created:
        vm = vm_entry(mount, name)
        if vm is not None and not vm["destroyed"]:
            request(mount.control, "vm.destroy", name=name)


def test_create_prints_the_name_and_destroy_removes_the_directory(mount: Mount, new_vm) -> None:
    before = server_state(mount)
    name = new_vm("--memory", "128M", "--vcpus", "1")
    assert (mount.path / name).is_dir()
    assert name in os.listdir(mount.path)
    assert files_of(mount, name) == per_vm_files("latest", 1)
    assert int(name.split("-")[1]) >= 10  # fds from 10 up, like QEMU's
    result = mount.cli("vm", "destroy", name)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not (mount.path / name).exists()
    assert server_state(mount) == before


# (options, what `vm list --json` must say, the profile whose file set the directory holds)
CREATE_OPTIONS = {
    "all-options": (
        "--memory 512M --vcpus 3 --mmu tdp-legacy --kernel v5.14 --seed 5 --rmap-design D",
        {"memory": 512 << 20, "vcpus": 3, "mmu": "tdp-legacy", "kernel": "v5.14", "seed": 5, "rmap_design": "D"},
        "v5.14",
    ),
    "tdp-v5.15-ffs": (  # NAME+ffs is NAME: the kernel's buckets are every profile's default
        "--memory 1G --vcpus 1 --mmu tdp --kernel v5.15+ffs --seed 0 --rmap-design A",
        {"memory": 1 << 30, "vcpus": 1, "mmu": "tdp", "kernel": "v5.15", "rmap_buckets": "ffs", "seed": 0,
         "rmap_design": "A"},
        "v5.15",
    ),
    "latest-fls": (
        "--memory 256M --vcpus 1 --kernel latest+fls",
        {"memory": 256 << 20, "vcpus": 1, "mmu": "shadow", "kernel": "latest+fls", "rmap_buckets": "fls"},
        "latest",
    ),
    "profile-defaults": (
        "--memory 2048M --kernel v5.15",
        {"memory": 2 << 30, "vcpus": 2, "mmu": "shadow", "kernel": "v5.15", "rmap_design": "B"},
        "v5.15",
    ),
    "mount-defaults": (
        "",
        {"memory": 6 << 30, "vcpus": 2, "mmu": "shadow", "kernel": "latest", "rmap_buckets": "ffs", "rmap_design": "C"},
        "latest",
    ),
}


@pytest.mark.parametrize("options, expected, profile", CREATE_OPTIONS.values(), ids=CREATE_OPTIONS.keys())
def test_create_options_are_honoured(mount: Mount, new_vm, options: str, expected: dict, profile: str) -> None:
    """`vm list --json` reports what was asked for; the directory holds that kernel's files for that many vCPUs."""
    name = new_vm(*options.split())
    listed = {vm["name"]: vm for vm in json.loads(mount.cli("vm", "list", "--json").stdout)}
    vm = listed[name]
    assert {key: vm[key] for key in expected} == expected
    assert (vm["users_count"], vm["destroyed"], isinstance(vm["seed"], int)) == (1, False, True)
    files = files_of(mount, name)
    assert files == per_vm_files(profile, expected["vcpus"])
    assert ("mmu_rmaps_stat" in files) == (profile != "v5.14")
    assert sorted(os.listdir(mount.path / name / "vcpu0")) == [path[6:] for path in files if path[:6] == "vcpu0/"]


def test_vm_list_table_json_and_a_pinned_vm(mount: Mount, new_vm) -> None:
    """Table rows match the JSON; a destroyed VM held by an open file shows as pinned, then goes with the close."""
    name = new_vm("--memory", "1536M", "--vcpus", "2", "--mmu", "tdp", "--kernel", "v6.4")
    listed = json.loads(mount.cli("vm", "list", "--json").stdout)
    assert listed == request(mount.control, "vm.list") and name in [vm["name"] for vm in listed]
    table = mount.cli("vm", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "MEMORY", "VCPUS", "MMU", "KERNEL", "RMAP", "USERS", "STATE"]
    assert [row.split()[0] for row in table[1:]] == [vm["name"] for vm in listed]
    columns = [name, "1536M", "2", "tdp", "v6.4", "C", "1"]
    row = listed[[vm["name"] for vm in listed].index(name)]
    uptime = f"{row['uptime_s']:.1f}s"
    assert table[1 + [vm["name"] for vm in listed].index(name)].split() == [*columns, "up", uptime]

    with open(mount.path / name / "halt_exits", "rb") as pinned:
        assert mount.cli("vm", "destroy", name).returncode == 0
        assert (mount.path / name).is_dir()
        row = next(row for row in mount.cli("vm", "list").stdout.splitlines() if row.startswith(name))
        assert row.split() == [*columns, *"destroyed (pinned by open files)".split()]
        assert (vm_entry(mount, name)["users_count"], vm_entry(mount, name)["destroyed"]) == (1, True)
        before = server_state(mount)
        result = mount.cli("vm", "destroy", name, check=False)
        assert_one_error_line(result, 1, f"{ERROR}VM '{name}' is already destroyed (kept alive by open files)")
        assert server_state(mount) == before
        assert re.fullmatch(rb"[0-9]+\n", pinned.read())
    wait_until(lambda: not (mount.path / name).exists())
    assert not (mount.path / name).exists() and vm_entry(mount, name) is None


@pytest.mark.parametrize("wait", [[], ["--wait-booted", "30"]], ids=["now", "wait-booted"])
def test_status(mount: Mount, wait: list[str]) -> None:
    result = mount.cli("status", *wait)
    assert result.stderr == ""
    status = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert status == {
        "kernel": "latest",
        "seed": "11",
        "clock": "manual",
        "host_time_ns": str(request(mount.control, "status")["host_time_ns"]),
        "vms": str(len(request(mount.control, "vm.list"))),
        "mountpoint": str(mount.path.resolve()),
        "server_pid": str(mount.process.pid),
        "open_files": "0",
        "control": str(mount.control),
        "log": "None",  # a foreground server without --log writes to its stderr
        "served": "True",
        "booted": "True",
        "booting": "[]",
        "boot_error": "None",
    }


def test_mount_from_the_environment(mount: Mount) -> None:
    result = run_cli(dict(mount.env, KVMDBGFS_MOUNT=str(mount.path)), "vm", "list", "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == request(mount.control, "vm.list")


MEMORY_RANGE = "memory must be a multiple of 4 KiB between 64 MiB and 64 GiB"
# (arguments, exit status, the error after ERROR; '…' ends a prefix)
REFUSALS = {
    "unknown-vm": (f"vm destroy {MISSING_VM}", 1, f"no VM named '{MISSING_VM}'"),
    "memory-lots": ("vm create --memory lots", 1, "bad memory size 'lots' (examples: 6G, 512M)"),
    "memory-1M": ("vm create --memory 1M", 1, MEMORY_RANGE),
    "memory-65G": ("vm create --memory 65G", 1, MEMORY_RANGE),
    "memory-fraction": ("vm create --memory 1.5G", 1, "bad memory size '1.5G' (examples: 6G, 512M)"),
    "vcpus-0": ("vm create --memory 256M --vcpus 0", 1, "vcpus must be between 1 and 1024"),
    "vcpus-1025": ("vm create --memory 256M --vcpus 1025", 1, "vcpus must be between 1 and 1024"),
    "unknown-kernel": ("vm create --kernel v9", 1, "unknown kernel profile 'v9' (known: …"),
    "unknown-kernel-variant": ("vm create --kernel latest+log2", 1, "unknown kernel profile 'latest+log2' (known: …"),
    "negative-seed": ("vm create --seed -1", 1, "seed must be between 0 and 2**63-1"),
    "huge-seed": (f"vm create --seed {2**63}", 1, "seed must be between 0 and 2**63-1"),
    "unknown-mmu": ("vm create --mmu ept", 2, "argument --mmu: invalid choice: 'ept' …"),
    "unknown-rmap-design": ("vm create --rmap-design E", 2, "argument --rmap-design: invalid choice: 'E' …"),
    "vcpus-not-a-number": ("vm create --vcpus two", 2, "argument --vcpus: invalid integer value: 'two'"),
    "vcpus-with-underscore": ("vm create --vcpus 1_0", 2, "argument --vcpus: invalid integer value: '1_0'"),
    "vcpus-in-other-digits": ("vm create --vcpus \u0662", 2, "argument --vcpus: invalid integer value: '\u0662'"),
    "no-vm-command": ("vm", 2, "the following arguments are required: vm_command"),
    "destroy-without-name": ("vm destroy", 2, "the following arguments are required: name"),
    "unknown-command": ("start", 2, "argument command: invalid choice: 'start' …"),
    "cancel-unknown-vm": (f"cancel --vm {MISSING_VM}", 1, f"no VM named '{MISSING_VM}'"),
    "cancel-without-vm": ("cancel", 2, "the following arguments are required: --vm"),
    "timeout-zero": ("--timeout 0 status", 2, "argument --timeout: invalid seconds value: '0'"),
    "timeout-infinite": ("--timeout inf status", 2, "argument --timeout: invalid seconds value: 'inf'"),
    "wait-booted-zero": ("status --wait-booted 0", 2, "argument --wait-booted: invalid seconds value: '0'"),
}


@pytest.mark.parametrize("argv, status, message", REFUSALS.values(), ids=REFUSALS.keys())
def test_refusal_changes_nothing(mount: Mount, argv: str, status: int, message: str) -> None:
    before = server_state(mount)
    assert_one_error_line(mount.cli(*argv.split(), check=False), status, ERROR + message)
    assert server_state(mount) == before


def test_cancel_with_no_workload_running(mount: Mount, new_vm) -> None:
    name = new_vm("--memory", "64M", "--vcpus", "1")
    before = server_state(mount)
    result = mount.cli("cancel", "--vm", name, check=False)
    assert_one_error_line(result, 1, f"{ERROR}no workload is running on VM {name}")
    assert server_state(mount) == before


def test_destroying_twice(mount: Mount, new_vm) -> None:
    name = new_vm("--memory", "64M", "--vcpus", "1")
    mount.destroy_vm(name)
    before = server_state(mount)
    assert_one_error_line(mount.cli("vm", "destroy", name, check=False), 1, f"{ERROR}no VM named '{name}'")
    assert server_state(mount) == before


NO_SERVER = {
    "no-mount-given": (lambda tmp: [], "no mount given: use -m MOUNTPOINT (or set KVMDBGFS_MOUNT)"),
    "directory-without-server": (lambda tmp: ["-m", str(tmp)], "no kvmdbgfs server is listening for {tmp}"),
    "missing-directory": (lambda tmp: ["-m", str(tmp / "nope")], "{tmp}/nope: not a directory"),
}


@pytest.mark.parametrize("mount_args, message", NO_SERVER.values(), ids=NO_SERVER.keys())
def test_no_server_to_talk_to(mount: Mount, tmp_path, mount_args, message: str) -> None:
    """Exit 1 with one line; the running mount, not named, is untouched."""
    env = {key: value for key, value in mount.env.items() if key != "KVMDBGFS_MOUNT"}
    before = server_state(mount)
    assert_one_error_line(run_cli(env, *mount_args(tmp_path), "vm", "list"), 1, ERROR + message.format(tmp=tmp_path))
    assert server_state(mount) == before


def exchange(path: os.PathLike, payload: bytes) -> list:
    """Send ``payload`` then a good `vm.list` on one connection; the two answers (None: no answer). Heartbeats,
    which a slow answer may come after, are skipped."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(os.fspath(path))
        sock.sendall(payload + b'{"cmd": "vm.list", "args": {}}\n')
        messages = (json.loads(line) for line in sock.makefile("rb"))
        answers = (message for message in messages if message != {"heartbeat": True})
        return [next(answers, None), next(answers, None)]


RAW_REQUESTS = {
    "not-json": b"create a vm please\n",
    "empty-line": b"\n",
    "truncated-json": b'{"cmd": "vm.list", "args": {\n',
    "not-utf8": b"\xff\xfe{}\n",
    "json-array": b'["vm.list", {}]\n',
    "json-number": b"42\n",
    "json-string": b'"vm.list"\n',
    "json-null": b"null\n",
    "no-cmd": b'{"args": {}}\n',
    "unknown-cmd": b'{"cmd": "vm.start", "args": {}}\n',
    "cmd-not-a-string": b'{"cmd": 7, "args": {}}\n',
    "cmd-a-list": b'{"cmd": ["vm.list"], "args": {}}\n',
    "args-a-list": b'{"cmd": "vm.list", "args": []}\n',
    "args-null": b'{"cmd": "status", "args": null}\n',
    "extra-arg": b'{"cmd": "vm.list", "args": {"all": true}}\n',
    "extra-create-arg": b'{"cmd": "vm.create", "args": {"memory": "256M", "colour": "red"}}\n',
    "missing-destroy-name": b'{"cmd": "vm.destroy", "args": {}}\n',
    "name-an-int": b'{"cmd": "vm.destroy", "args": {"name": 4242}}\n',
    "name-a-list": b'{"cmd": "vm.destroy", "args": {"name": ["a"]}}\n',
    "vcpus-a-string": b'{"cmd": "vm.create", "args": {"memory": "256M", "vcpus": "2"}}\n',
    "vcpus-a-bool": b'{"cmd": "vm.create", "args": {"memory": "256M", "vcpus": true}}\n',
    "memory-a-float": b'{"cmd": "vm.create", "args": {"memory": 1.5e9}}\n',
    "memory-negative": b'{"cmd": "vm.create", "args": {"memory": -268435456}}\n',
    "seed-a-string": b'{"cmd": "vm.create", "args": {"memory": "256M", "seed": "1"}}\n',
    "mmu-a-list": b'{"cmd": "vm.create", "args": {"memory": "256M", "mmu": ["tdp"]}}\n',
    "mmu-unknown": b'{"cmd": "vm.create", "args": {"memory": "256M", "mmu": "ept"}}\n',
    "kernel-a-number": b'{"cmd": "vm.create", "args": {"memory": "256M", "kernel": 515}}\n',
    "rmap-design-unknown": b'{"cmd": "vm.create", "args": {"memory": "256M", "rmap_design": "c"}}\n',
    "rmap-design-an-object": b'{"cmd": "vm.create", "args": {"memory": "256M", "rmap_design": {}}}\n',
}


@pytest.mark.parametrize("payload", RAW_REQUESTS.values(), ids=RAW_REQUESTS.keys())
def test_malformed_request_is_answered(mount: Mount, payload: bytes) -> None:
    """ok=false with a one-line error; the connection answers the next request; nothing changed."""
    before = server_state(mount)
    refusal, listing = exchange(mount.control, payload)
    assert refusal is not None, "no answer: the server dropped the connection"
    assert refusal.keys() == {"ok", "error"} and refusal["ok"] is False, refusal
    assert isinstance(refusal["error"], str) and refusal["error"] and "\n" not in refusal["error"]
    assert listing == {"ok": True, "result": before[0]}
    assert server_state(mount) == before


def test_installed_mount_command_and_python_m_are_mount_py(tmp_path: Path) -> None:
    """`kvmdbgfs mount` and `python -m kvmdbgfs mount` are mount.py: a bad mountpoint gets their one line."""
    for command, prog in (
        ([str(Path(sys.executable).parent / "kvmdbgfs"), "mount"], "kvmdbgfs mount"),
        ([sys.executable, "-m", "kvmdbgfs", "mount"], "kvmdbgfs mount"),
    ):
        result = subprocess.run([*command, str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stderr) == (2, f"{prog}: error: {tmp_path / 'missing'}: no such file or directory\n")
