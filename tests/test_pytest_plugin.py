"""The pytest plugin, as another project uses it: a tiny project's tests run by pytest in a process of their own
(pytester), the plugin active through its entry point. They pass with FUSE, under xdist too (each worker
its own mounts); they skip with the one-line reason when FUSE is hidden from them (no fusermount3 on PATH;
no /dev/fuse, in a private mount namespace; mounting refused, in a user namespace as in an unprivileged
container), fail instead under KVMDBGFS_REQUIRE_FUSE=1, and get a snapshot directory when they ask for the
fallback."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import is_mounted

pytest_plugins = ["pytester"]

ONE_VM = """\
seed = 3
[[vm]]
memory = "256M"
vcpus = 1
mmu = "shadow"
workload = "idle"
settings = { uptime = 0, workers = 0, logins = 1 }
"""

TINY_PROJECT = '''
import json
import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def record(tree):
    """Where the tree is, for the test that runs this project."""
    line = {"worker": os.environ.get("PYTEST_XDIST_WORKER", "-"), "path": str(tree.path), "snapshot": tree.is_snapshot}
    with open(HERE / "trees.jsonl", "a") as out:
        out.write(json.dumps(line) + "\\n")


@pytest.mark.kvm_debugfs(scenario=str(HERE / "one_vm.toml"))
def test_stat_files(kvm_debugfs):
    record(kvm_debugfs)
    (vm,) = kvm_debugfs.vms()
    assert vm["booted"] and kvm_debugfs.status()["clock"] == "manual"
    assert kvm_debugfs.run(vm["name"], "rmap_fork", children=10)["workload"] == "rmap_fork"
    new = kvm_debugfs.create_vm(memory="256M", vcpus=2)
    kvm_debugfs.advance("200ms")
    top = int((kvm_debugfs.path / "exits").read_text())
    assert top > 0 and top == sum(int((kvm_debugfs.path / name / "exits").read_text()) for name in (vm["name"], new))
    kvm_debugfs.destroy_vm(new)
    assert not (kvm_debugfs.path / new).exists()


def test_two_trees(kvm_debugfs_factory):
    first, second = kvm_debugfs_factory(scenario="empty"), kvm_debugfs_factory(scenario="empty")
    record(first)
    record(second)
    assert first.path != second.path
    assert first.create_vm(memory="256M") in os.listdir(first.path)
    assert not [name for name in os.listdir(second.path) if "-" in name]  # the other tree has no VM


@pytest.mark.kvm_debugfs(scenario="empty")
def test_fails_on_purpose(kvm_debugfs):
    record(kvm_debugfs)
    assert not (kvm_debugfs.path / "exits").exists(), "failing on purpose: the tree is still taken down"


@pytest.mark.kvm_debugfs(scenario="empty", snapshot_fallback=True)
def test_with_fallback(kvm_debugfs):
    record(kvm_debugfs)
    assert kvm_debugfs.is_snapshot == (os.environ.get("EXPECT_SNAPSHOT") == "1")
    name = kvm_debugfs.create_vm(memory="256M")
    assert (kvm_debugfs.path / name / "exits").read_text() == "0\\n"
'''


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_tool=TINY_PROJECT)
    (pytester.path / "one_vm.toml").write_text(ONE_VM)
    return pytester


def trees(project: pytest.Pytester) -> list[dict]:
    import json

    path = project.path / "trees.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def no_fuse_helper_path(tmp_path: Path) -> str:
    """A PATH with the usual tools but no fusermount3 or fusermount."""
    bin_dir = tmp_path / "bin-without-fuse"
    bin_dir.mkdir()
    for tool in ("cat", "ls", "sh", "bash"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def test_a_tiny_project_passes_under_xdist(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMDBGFS_REQUIRE_FUSE", "1")
    result = project.runpytest_subprocess("-p", "xdist", "-n", "2", "-p", "no:cacheprovider", timeout=240)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*failing on purpose: the tree is still taken down*"])
    seen = trees(project)
    assert len(seen) == 5 and not any(tree["snapshot"] for tree in seen)
    assert len({tree["path"] for tree in seen}) == 5  # one mountpoint each, whichever worker
    assert {tree["worker"] for tree in seen} <= {"gw0", "gw1"}
    assert not any(is_mounted(Path(tree["path"])) for tree in seen)  # all unmounted at teardown


def test_without_fusermount_it_skips_with_the_reason(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", no_fuse_helper_path(tmp_path))
    monkeypatch.setenv("EXPECT_SNAPSHOT", "1")
    monkeypatch.delenv("KVMDBGFS_REQUIRE_FUSE", raising=False)
    result = project.runpytest_subprocess("-rs", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1, skipped=3)
    reason = "kvmdbgfs: FUSE is unavailable: no fusermount3 (or fusermount) on PATH (install the fuse3 package)"
    result.stdout.fnmatch_lines([f"SKIPPED [[]1[]] *: {reason}"] * 3)
    assert [tree["snapshot"] for tree in trees(project)] == [True]

    monkeypatch.setenv("KVMDBGFS_REQUIRE_FUSE", "1")
    required = project.runpytest_subprocess("-p", "no:cacheprovider", "-k", "test_two_trees", timeout=120)
    required.assert_outcomes(failed=1)
    required.stdout.fnmatch_lines([f"{reason} (KVMDBGFS_REQUIRE_FUSE=1)"])
    assert "During handling" not in required.stdout.str()


def unshare_works(*flags: str) -> bool:
    """Whether this machine lets us make the namespaces ``flags`` ask for."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", *flags, "true"], capture_output=True, timeout=10, check=False).returncode == 0


@pytest.mark.skipif(not unshare_works("--user", "--map-root-user"), reason="user namespaces are not allowed here")
def test_in_an_unprivileged_user_namespace_it_skips_with_the_reason(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in a container without CAP_SYS_ADMIN: /dev/fuse and fusermount3 are there, mounting is refused. (The
    tests whose scenarios boot no guest: a server that could not mount still lets a boot finish first.)"""
    monkeypatch.delenv("KVMDBGFS_REQUIRE_FUSE", raising=False)  # .ci/run sets it; here the skip is the point
    command = ["unshare", "--user", "--map-root-user", sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider"]
    selected = ["-k", "two_trees or on_purpose"]
    result = subprocess.run(
        command + selected, cwd=project.path, capture_output=True, text=True, timeout=120, check=False
    )
    assert "2 skipped" in result.stdout, result.stdout + result.stderr
    reason = "kvmdbgfs: FUSE is unavailable: could not mount * (FUSE refused it: mounting not permitted here?)"
    assert len(fnmatch.filter(result.stdout.splitlines(), f"SKIPPED *: {reason}")) == 2, result.stdout


@pytest.mark.skipif(os.getuid() != 0 or not unshare_works("--mount"), reason="needs root for a mount namespace")
def test_without_dev_fuse_it_skips_with_the_reason(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """/dev/fuse really missing: a tmpfs over /dev (with null, zero, random, urandom) in a private mount namespace."""
    monkeypatch.delenv("KVMDBGFS_REQUIRE_FUSE", raising=False)  # .ci/run sets it; here the skip is the point
    hide = (
        'set -e; d=$(mktemp -d); mount -t tmpfs none "$d"; for n in null zero random urandom; do '
        'touch "$d/$n"; mount --bind "/dev/$n" "$d/$n"; done; mount --bind "$d" /dev; exec "$@"'
    )
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", hide, "sh"]
    command += [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", "-k", "not fallback"]
    result = subprocess.run(command, cwd=project.path, capture_output=True, text=True, timeout=120, check=False)
    assert "3 skipped" in result.stdout, result.stdout + result.stderr
    reason = "kvmdbgfs: FUSE is unavailable: no /dev/fuse"
    reason += " (load the fuse module; a container needs the device passed in)"
    assert result.stdout.count(reason) == 3, result.stdout
    assert os.path.exists("/dev/fuse")  # the caller's namespace is untouched
