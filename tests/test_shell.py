"""A shell session against a real mount: coreutils see exactly the kernel's tree."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, mount_with_scenario
from expected_files import PROFILE_STATS, per_vm_files

# Three VMs whose layout is known: heads per level come from the q35 memslots
# of both address spaces (1 GiB: all RAM below 4 GiB).
SCENARIO = """
seed = 11
[[vm]]
memory = "1G"
vcpus = 2
mmu = "shadow"
[[vm]]
memory = "512M"
vcpus = 1
mmu = "tdp-legacy"
kernel = "v5.15"
[[vm]]
memory = "512M"
vcpus = 3
mmu = "tdp"
"""
# 1 GiB q35 guest: 4K heads = 2 * (160 + 64 + 261888 + 4096 + 64) + 32 (SMRAM), plus KVM's private slots in
# both address spaces: with EPT off the TSS (3 pages) and the APIC-access page (1), with EPT on the APIC page only.
RMAPS_1G = (
    "Rmap_Count:\t0\t1\t2-3\t4-7\t8-15\t16-31\t32-63\t64-127\t128-255\t256-511\t512-1023\t\n"
    "Level=4K:\t532584\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t\n"
    "Level=2M:\t1062\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t\n"
    "Level=1G:\t26\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t\n"
)
# 512 MiB: 1M..512M is 130816 pages and 256 2M frames.
RMAPS_512M = (
    RMAPS_1G.splitlines(keepends=True)[0]
    + "Level=4K:\t270434\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t\n"
    + "Level=2M:\t548\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t\n"
    + "Level=1G:\t24\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t\n"
)


@pytest.fixture(scope="module")
def shell_mount(tmp_path_factory) -> Iterator[Mount]:
    with mount_with_scenario(tmp_path_factory, SCENARIO) as mount:
        yield mount


def vm_names(mount: Mount) -> list[str]:
    """shadow, tdp-legacy, tdp in creation order (from the CLI)."""
    return [vm["name"] for vm in json.loads(mount.cli("vm", "list", "--json").stdout)]


def test_ls_shows_stats_and_vm_directories(shell_mount: Mount) -> None:
    names = vm_names(shell_mount)
    listing = shell_mount.sh("ls -1").split()
    assert sorted(listing) == sorted(PROFILE_STATS["latest"] + names)
    assert shell_mount.sh("ls -d */").split() == sorted(f"{name}/" for name in names)


def test_file_list_per_vm_matches_the_profile(shell_mount: Mount) -> None:
    shadow, legacy, tdp = vm_names(shell_mount)
    for name, profile, vcpus in ((shadow, "latest", 2), (legacy, "v5.15", 1), (tdp, "latest", 3)):
        found = shell_mount.sh(f"cd {name} && find . -type f | sed 's|^./||' | sort").split()
        assert found == per_vm_files(profile, vcpus)


def test_cat_grep_head_cut_wc_find(shell_mount: Mount) -> None:
    shadow, legacy, tdp = vm_names(shell_mount)
    assert shell_mount.sh("cat */max_mmu_rmap_size") == "0\n0\n0\n"
    assert shell_mount.sh("grep -H . */pages_4k") == "".join(f"{n}/pages_4k:0\n" for n in sorted(vm_names(shell_mount)))
    header = RMAPS_1G.splitlines()[0]
    assert shell_mount.sh(f"head -1 {shadow}/mmu_rmaps_stat") == header + "\n"
    assert shell_mount.sh(f"cut -f2 {shadow}/mmu_rmaps_stat") == "0\n532584\n1062\n26\n"
    assert shell_mount.sh(f"cut -f2 {legacy}/mmu_rmaps_stat") == "0\n270434\n548\n24\n"
    assert shell_mount.sh(f"wc -l < {shadow}/mmu_rmaps_stat").strip() == "4"
    assert shell_mount.sh(f"wc -c < {tdp}/mmu_rmaps_stat").strip() == "0"
    # 60 top-level stats; each VM: its stats, mmu_rmaps_stat, and the vCPU files.
    expected_files = 60 + (60 + 1 + 2 * 6) + (51 + 1 + 1 * 5) + (60 + 1 + 3 * 6)
    assert shell_mount.sh("find . -type f | wc -l").strip() == str(expected_files)
    assert shell_mount.sh("find . -mindepth 1 -type d | wc -l").strip() == str(3 + 2 + 1 + 3)


def test_mmu_rmaps_stat_bytes(shell_mount: Mount) -> None:
    shadow, legacy, tdp = vm_names(shell_mount)
    assert (shell_mount.path / shadow / "mmu_rmaps_stat").read_bytes() == RMAPS_1G.encode()
    assert (shell_mount.path / legacy / "mmu_rmaps_stat").read_bytes() == RMAPS_512M.encode()
    assert (shell_mount.path / tdp / "mmu_rmaps_stat").read_bytes() == b""


def test_python_open_reads_whole_files_in_small_chunks(shell_mount: Mount) -> None:
    shadow = vm_names(shell_mount)[0]
    with open(shell_mount.path / shadow / "mmu_rmaps_stat", "rb", buffering=0) as handle:
        chunks = []
        while chunk := handle.read(7):
            chunks.append(chunk)
    assert b"".join(chunks) == RMAPS_1G.encode()
    tsc = (shell_mount.path / shadow / "vcpu1" / "tsc-offset").read_text()
    assert tsc.startswith("-") and tsc.endswith("\n") and int(tsc) < 0


def test_files_report_a_page_as_size_and_kernel_modes(shell_mount: Mount) -> None:
    """Files report one page, as sysfs files do (README, "Tools and copying"); directories 0."""
    shadow = vm_names(shell_mount)[0]
    out = shell_mount.sh(f"stat -c '%s %a %n' exits pages_4k {shadow}/mmu_rmaps_stat {shadow}/vcpu0/pid {shadow}")
    assert out.splitlines() == [
        "4096 644 exits",
        "4096 444 pages_4k",
        f"4096 644 {shadow}/mmu_rmaps_stat",
        f"4096 444 {shadow}/vcpu0/pid",
        f"0 755 {shadow}",
    ]


def test_echo_zero_clears_through_bash(shell_mount: Mount) -> None:
    shadow = vm_names(shell_mount)[0]
    shell_mount.sh(f"echo 0 > {shadow}/max_mmu_rmap_size && echo 0 > max_mmu_rmap_size")
    assert shell_mount.sh("cat max_mmu_rmap_size") == "0\n"


def test_vcpu_pid_files(shell_mount: Mount) -> None:
    shadow, legacy, tdp = vm_names(shell_mount)
    # No guest was booted: the vCPU threads never entered KVM_RUN, and vcpu_get_pid() gives 0 until they do.
    assert shell_mount.sh(f"cat {shadow}/vcpu*/pid") == "0\n0\n"
    assert not Path(shell_mount.path / legacy / "vcpu0" / "pid").exists()
