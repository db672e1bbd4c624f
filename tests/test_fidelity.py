"""The default scenario's guests against the seed's observation (idle 6 GiB guest, EPT=N, ffs buckets).

The seed's tables: ``Level=4K: 3086676 53045 12330 1272 502 121 76 2 0 0 0``
(cover letter) and ``3089171 49005 14016 1363 235 212 15 7 0 0 0`` (the
merged patch), ``Level=2M: 5947 231 0 ...``, ``Level=1G: 32 0 ...``. These
tests hold the shape: about 3.15M 4K heads over both address spaces, nearly
all empty, tens of thousands of non-empty ones, falling column by column
down to a few in 64-127 (under ffs: lists of exactly 64 entries) and none
beyond, small 2M and 1G lines; with EPT only the 0 and 1 columns.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from inprocess import cat
from test_workloads import histogram, running_vmm

from kvmdbgfs.kvm.host import KvmHost
from kvmdbgfs.kvm.vm import Kvm
from kvmdbgfs.workloads import run_workload

# The q35 slots of both address spaces plus KVM's private TSS (3 pages) and APIC-access (1 page) slots in each:
# the 4K total is the seed's own (3154024).
HEADS_6G = {"4K": 3154016 + 8, "2M": 6178 + 4, "1G": 32 + 4}
# With EPT on (unrestricted guest) there is no TSS slot: the APIC-access page alone.
HEADS_6G_EPT = {"4K": 3154016 + 2, "2M": 6178 + 2, "1G": 32 + 2}


@pytest.fixture(scope="module")
def default_pair() -> Iterator[tuple[KvmHost, list[Kvm]]]:
    """The default scenario built in-process (the same seeds, VMs and workloads; a manual clock): the host
    and the two VMs' struct kvm."""
    with running_vmm("latest", seed=0) as vmm:
        host = vmm.host
        vms = [vmm.create_vm(host.make_config(memory="6G", vcpus=2, mmu=mmu)) for mmu in ("shadow", "tdp-legacy")]
        for vm in vms:
            run_workload(vm, "idle", {})
        yield host, [vm.kvm for vm in vms]


def test_idle_shadow_guest_has_the_seeds_shape(default_pair) -> None:
    host, (shadow, _) = default_pair
    rows = histogram(host, shadow)
    assert {level: sum(row) for level, row in rows.items()} == HEADS_6G
    four_k = rows["4K"]
    assert four_k[0] > 0.98 * HEADS_6G["4K"]
    assert 40000 < sum(four_k[1:]) < 100000  # the seed: 64.8K and 67.3K non-empty heads
    assert all(four_k[column] > four_k[column + 1] for column in range(1, 7))  # falling column by column
    assert four_k[7] > 0 and sum(four_k[8:]) == 0  # down to 64-127 and nothing beyond, as in the seed
    assert 64 <= shadow.stat.max_mmu_rmap_size < 128  # libc pages mapped by most of the ~80 user processes
    assert 0 < sum(rows["2M"][1:]) < 0.1 * HEADS_6G["2M"]
    assert rows["1G"][0] == HEADS_6G["1G"]


def test_idle_ept_guest_has_only_the_0_and_1_columns(default_pair) -> None:
    host, (_, ept) = default_pair
    rows = histogram(host, ept)
    assert {level: sum(row) for level, row in rows.items()} == HEADS_6G_EPT
    assert all(sum(row[2:]) == 0 for row in rows.values())
    assert ept.stat.max_mmu_rmap_size == 0  # no add ever found an entry already there


def test_make_runs_default_scenario_shows_the_same_bytes_through_fuse(default_pair, mount_factory) -> None:
    """`make run`'s scenario, mounted and read with cat, is byte for byte the tree built in-process."""
    host, vms = default_pair
    mount = mount_factory("--scenario", "default")
    expected = "".join(cat(host.debugfs_dir, f"{kvm.name}/mmu_rmaps_stat") for kvm in vms)
    names = " ".join(f"{kvm.name}/mmu_rmaps_stat" for kvm in vms)
    assert mount.sh(f"cat {names}") == expected
    assert mount.sh("cat max_mmu_rmap_size") == f"{sum(kvm.stat.max_mmu_rmap_size for kvm in vms)}\n"
