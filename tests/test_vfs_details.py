"""Smaller VFS details as the kernel has them: simple_attr_read on a fresh open at an offset, dcache_readdir's
order (``ls -U``), and KVM's private memslots in mmu_rmaps_stat."""

from __future__ import annotations

import os

import pytest
from inprocess import cat
from mmu_testlib import new_vm

from kvmdbgfs.arch.x86.mmu.memslot import KvmMemorySlot, kvm_mmu_slot_lpages
from kvmdbgfs.debugfs.dentry import lookup
from kvmdbgfs.debugfs.file import vfs_open
from kvmdbgfs.kvm.profiles import get_profile
from kvmdbgfs.vmm.layout import q35_memslots

X86_VCPU_FILES = ["pid", "guest_mode", "tsc-offset", "lapic_timer_advance_ns", "tsc-scaling-ratio",
                  "tsc-scaling-ratio-frac-bits"]


def test_a_fresh_open_read_at_offset_2_formats_the_value() -> None:
    kvm = new_vm(vcpus=1)
    dentry = lookup(kvm.host.debugfs_dir, f"{kvm.name}/vcpu0/tsc-offset")
    whole = dentry.fops.read(vfs_open(dentry, os.O_RDONLY), 100, 0)
    fresh = vfs_open(dentry, os.O_RDONLY)
    assert len(whole) > 4 and dentry.fops.read(fresh, 100, 2) == whole[2:]
    # Once generated, a read past offset 0 continues the same text (no new get()).
    assert dentry.fops.read(fresh, 100, 1) == whole[1:]


def test_pread_at_offset_2_through_the_mount(mount_factory) -> None:
    mount = mount_factory("--scenario", "empty")
    name = mount.create_vm("--vcpus", "1", "--memory", "256M")
    path = mount.path / name / "vcpu0" / "tsc-offset"
    whole = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 2) == whole[2:] and len(whole) > 4
    finally:
        os.close(fd)
    # ls -U: readdir order is newest first, in every directory (the VM's directory is the newest at the top).
    profile = get_profile("latest")
    stats = [desc.name for desc in profile.vm_stats + profile.vcpu_stats]
    assert mount.sh("ls -U").split() == [name, *stats[::-1]]
    assert mount.sh(f"ls -U {name}").split() == ["vcpu0", "mmu_rmaps_stat", *stats[::-1]]
    assert mount.sh(f"ls -U {name}/vcpu0").split() == X86_VCPU_FILES[::-1]
    assert mount.sh("ls").split() == sorted([name, *stats])  # ls sorts, as ever


def heads(regions: list[tuple[int, int, int]]) -> list[int]:
    """Rmap heads per level of slots given as (as_id, base_gfn, npages)."""
    slots = [KvmMemorySlot(0, as_id, base, npages) for as_id, base, npages in regions]
    return [sum(kvm_mmu_slot_lpages(slot, level) for slot in slots) for level in (1, 2, 3)]


@pytest.mark.parametrize(("mmu", "private"), [("shadow", [(0xFEFFD, 3), (0xFEE00, 1)]), ("tdp-legacy", [(0xFEE00, 1)])])
def test_kvms_private_memslots_are_counted_in_every_level(mmu: str, private: list[tuple[int, int]]) -> None:
    """EPT off: the real-mode TSS (3 pages) and the APIC-access page in both address spaces; EPT on: the APIC
    page only. Their heads are in the 4K, 2M and 1G lines, all in column 0."""
    kvm = new_vm(mmu, memory="128M", vcpus=1)
    q35 = [(r.as_id, r.base_gfn, r.npages) for r in q35_memslots(128 << 20)]
    internal = [(as_id, base, npages) for as_id in (0, 1) for base, npages in private]
    lines = cat(kvm.host.debugfs_dir, f"{kvm.name}/mmu_rmaps_stat").splitlines()[1:]
    totals = [sum(int(v) for v in line.split("\t")[1:-1]) for line in lines]
    assert totals == heads(q35 + internal)
    assert [a - b for a, b in zip(totals, heads(q35))] == [2 * sum(n for _, n in private), 2 * len(private),
                                                           2 * len(private)]
    slots = {(s.as_id, s.id, s.base_gfn, s.npages) for s in kvm.arch.memslots if s.id >= 509}
    assert slots == {(as_id, 509 if npages == 3 else 510, base, npages) for as_id, base, npages in internal}
