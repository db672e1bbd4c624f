"""`kvmdbgfs exec`: a command sees the tree at /sys/kernel/debug/kvm, a debugfs line for /sys/kernel/debug in
/proc/mounts and vmx in /proc/cpuinfo, reaches the tree's server with `kvmdbgfs -m /sys/kernel/debug/kvm`, and
the caller's namespace is the same afterwards; as another user it goes through a user namespace, or fails
with one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, assert_one_error_line, mount_env, mount_with_scenario

from kvmdbgfs.nsexec import cpuinfo_with_flag, mounts_with_debugfs

EXEC_TIMEOUT = 120
SCENARIO = """
[[vm]]
memory = "128M"
vcpus = 2
[[vm]]
memory = "64M"
vcpus = 1
mmu = "tdp"
"""
# What a tool inside sees, as JSON: the first debugfs line of /proc/mounts, the cpu flags, each VM
# directory's exits and its pid's command line, and `kvmdbgfs vm list` through the namespace's mountpoint.
PROBE = r"""
import json, os, subprocess, sys
kvm = "/sys/kernel/debug/kvm"
debugfs = next(line.split(" ") for line in open("/proc/mounts") if line.split(" ")[2] == "debugfs")
flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
vms = sorted(name for name in os.listdir(kvm) if "-" in name)
listing = subprocess.run([sys.executable, "-m", "kvmdbgfs", "-m", kvm, "vm", "list", "--json"],
                         capture_output=True, text=True, check=True).stdout
print(json.dumps({
    "debugfs": debugfs[:3], "vmx": "vmx" in flags, "svm": "svm" in flags,
    "exits": {vm: int(open(f"{kvm}/{vm}/exits").read()) for vm in vms},
    "cmdlines": {vm: open(f"/proc/{vm.split('-')[0]}/cmdline").read().split("\0") for vm in vms},
    "listed": sorted(vm["name"] for vm in json.loads(listing)),
    "env": os.environ["KVMDBGFS_MOUNT"],
}))
"""


@pytest.fixture(scope="module")
def empty_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """A running mount with no VMs, for `exec --mount`."""
    with mount_with_scenario(tmp_path_factory, "") as running:
        yield running


def run_exec(*args: str, env: dict[str, str], prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [*prefix, sys.executable, "-m", "kvmdbgfs", "exec", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=EXEC_TIMEOUT, check=False)


def mountinfo(tmp_path: Path) -> list[str]:
    """This process's mount table, less the mounts other tests (run at the same time) make and drop in the
    temporary directory; the ones in this test's ``tmp_path`` stay."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    ours = str(tmp_path)
    return [line for line in lines if not line.split()[4].startswith("/tmp/") or line.split()[4].startswith(ours)]


def exec_env(tmp_path: Path) -> dict[str, str]:
    """The mount's environment, with exec's private directory made in ``tmp_path``."""
    return dict(mount_env(tmp_path), TMPDIR=str(tmp_path))


def test_a_command_sees_the_tree_where_kvm_stat_looks(tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    before = mountinfo(tmp_path)
    command = ("--scenario", str(scenario), "--clock", "manual", "--", sys.executable, "-c", PROBE)
    result = run_exec(*command, env=exec_env(tmp_path))
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["debugfs"] == ["debugfs", "/sys/kernel/debug", "debugfs"]
    assert seen["vmx"] and not seen["svm"]
    assert sorted(seen["exits"]) == seen["listed"] and len(seen["listed"]) == 2
    assert seen["env"] == "/sys/kernel/debug/kvm"
    for vm, args in seen["cmdlines"].items():  # QEMU stand-ins are on by default under exec
        assert args[0] == "qemu-system-x86_64" and args[args.index("-name") + 1].startswith("guest=vm"), (vm, args)
    assert mountinfo(tmp_path) == before
    for vm in seen["cmdlines"]:
        assert not os.path.exists(f"/proc/{vm.split('-')[0]}"), "a QEMU stand-in outlived exec"
    assert not list(tmp_path.glob("kvmdbgfs-exec-*"))


def test_a_running_mount_is_bound_and_its_server_reached(empty_mount: Mount, tmp_path: Path) -> None:
    before = mountinfo(tmp_path)
    script = (
        f"head -c0 /sys/kernel/debug/kvm/exits && awk '$3 == \"debugfs\" {{ print $2; exit }}' /proc/mounts && "
        f"{sys.executable} -m kvmdbgfs vm create --memory 64M --vcpus 1"
    )
    env = dict(empty_mount.env, TMPDIR=str(tmp_path))
    result = run_exec("--mount", str(empty_mount.path), "--", "sh", "-c", script, env=env)
    assert result.returncode == 0, result.stderr
    debugfs, created = result.stdout.split()
    assert debugfs == "/sys/kernel/debug"
    assert created in os.listdir(empty_mount.path)  # made inside, seen outside: the same server
    assert mountinfo(tmp_path) == before


def test_the_commands_exit_status_is_execs(empty_mount: Mount) -> None:
    assert run_exec("--mount", str(empty_mount.path), "--", "sh", "-c", "exit 7", env=empty_mount.env).returncode == 7
    missing = run_exec("--mount", str(empty_mount.path), "--", "no-such-command-here", env=empty_mount.env)
    assert_one_error_line(missing, 127, "kvmdbgfs exec: error: no-such-command-here: No such file or directory")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--",), "kvmdbgfs exec: error: no command given (kvmdbgfs exec [options] -- CMD ARGS...)"),
        (("--mount", "/", "--", "true"), "kvmdbgfs exec: error: /: not a served kvmdbgfs tree (no exits file)"),
        (("--mount", "/", "--clock", "manual", "--", "true"), "kvmdbgfs exec: error: --kernel, --clock and …"),
    ],
    ids=["no-command", "not-a-tree", "scenario-option-with-mount"],
)
def test_bad_usage_is_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    assert_one_error_line(run_exec(*args, env=mount_env(tmp_path)), 2, message)


def test_a_server_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    before = mountinfo(tmp_path)
    result = run_exec("--scenario", str(tmp_path / "missing.toml"), "--", "true", env=exec_env(tmp_path))
    server_error = f"kvmdbgfs mount: error: scenario '{tmp_path}/missing.toml'…"
    assert_one_error_line(result, 1, f"kvmdbgfs exec: error: the server did not start: {server_error}")
    assert mountinfo(tmp_path) == before and not list(tmp_path.glob("kvmdbgfs-exec-*"))


needs_unshare = pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1) to act as another user"
)


@needs_unshare
def test_as_a_normal_user_it_works_through_a_user_namespace_or_says_why(tmp_path: Path) -> None:
    """uid 1000 in a user namespace of its own: no privilege over the host's mounts, as a normal user has none
    (the interpreter lives under /root, which a real other user could not run)."""
    before = mountinfo(tmp_path)
    user = ("unshare", "--user", "--map-user=1000", "--map-group=1000", "--")
    script = "id -u; awk '$3 == \"debugfs\" { print $2; exit }' /proc/mounts; head -c0 /sys/kernel/debug/kvm/exits"
    result = run_exec("--scenario", "empty", "--", "sh", "-c", script, env=exec_env(tmp_path), prefix=user)
    if result.returncode == 0:
        assert result.stdout.split() == ["0", "/sys/kernel/debug"], result
    else:
        assert_one_error_line(result, 1, "kvmdbgfs exec: error: …")
    assert mountinfo(tmp_path) == before


@needs_unshare
def test_without_user_namespaces_a_normal_user_gets_one_line(tmp_path: Path) -> None:
    """A user namespace whose limit leaves none to make: the kernel refuses, as where they are disabled."""
    limit = 'echo 1 > /proc/sys/user/max_user_namespaces && exec unshare --user --map-user=1000 --map-group=1000 "$@"'
    prefix = ("unshare", "--user", "--map-root-user", "--", "sh", "-c", limit, "sh")
    result = run_exec("--scenario", "empty", "--", "true", env=mount_env(tmp_path), prefix=prefix)
    assert_one_error_line(
        result, 1, "kvmdbgfs exec: error: cannot make a user namespace as uid 1000 (No space left on device): …"
    )


def test_the_mount_table_shows_debugfs_first() -> None:
    table = (
        "/dev/vda / ext4 rw 0 0\n"
        "none /tmp/dbg debugfs rw,relatime 0 0\n"
        "kvmdbgfs /sys/kernel/debug tmpfs rw,relatime 0 0\n"
        "kvmdbgfs /sys/kernel/debug/kvm fuse.kvmdbgfs rw 0 0\n"
    )
    assert mounts_with_debugfs(table).splitlines() == [
        "/dev/vda / ext4 rw 0 0",
        "debugfs /sys/kernel/debug debugfs rw,relatime 0 0",
        "none /tmp/dbg debugfs rw,relatime 0 0",
        "kvmdbgfs /sys/kernel/debug/kvm fuse.kvmdbgfs rw 0 0",
    ]


def test_cpu_flags_get_vmx_only() -> None:
    text = "processor\t: 0\nflags\t\t: fpu svm lm\nbugs\t\t: none\n"
    assert cpuinfo_with_flag(text) == "processor\t: 0\nflags\t\t: fpu lm vmx\nbugs\t\t: none\n"


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv(1)")
def test_root_without_cap_sys_admin_gets_one_line(tmp_path: Path) -> None:
    """Root in an unprivileged container: no capabilities, so no mount namespace."""
    no_caps = ("setpriv", "--bounding-set=-all", "--inh-caps=-all", "--")
    result = run_exec("--scenario", "empty", "--", "true", env=exec_env(tmp_path), prefix=no_caps)
    assert_one_error_line(result, 1, "kvmdbgfs exec: error: cannot make a mount namespace: Operation not permitted …")
    assert not list(tmp_path.glob("kvmdbgfs-exec-*"))
