"""Golden mmu_rmaps_stat text for a known rmap state, built through the MMU API: the kernel's ffs buckets
(every profile's default) and the log2 (fls) buckets of the ``+fls`` variants."""

from __future__ import annotations

import pytest
from inprocess import cat
from mmu_testlib import new_vm

from kvmdbgfs.kvm.host import KvmHost

HEADER = "Rmap_Count:\t0\t1\t2-3\t4-7\t8-15\t16-31\t32-63\t64-127\t128-255\t256-511\t512-1023\t\n"
# 128 MiB guest, both address spaces: 4K heads 2*(160+64+32512+4096+64)+32, 2M 2*(1+7+64+8+1), 1G 2*11,
# plus KVM's private TSS (3 pages) and APIC-access (1 page) slots in each: 2*(3+1), 2*(1+1), 2*(1+1).
HEADS_4K, HEADS_2M, HEADS_1G = 73824 + 8, 162 + 4, 22 + 4
# Lists built on the low-RAM slot (gfn 0x200 onwards) of address space 0:
# lengths 1, 2, 3, 5, 6, 8, 12, 64, 100, 1000 at 4K; 3 and 4 at 2M; 2 at 1G.
LISTS_4K = (1, 2, 3, 5, 6, 8, 12, 64, 100, 1000)
LISTS_2M = (3, 4)
LISTS_1G = (2,)


def row(level: str, columns: dict[int, int], heads: int) -> str:
    values = [columns.get(i, 0) for i in range(11)]
    values[0] = heads - sum(values[1:])
    return f"Level={level}:\t" + "".join(f"{v}\t" for v in values) + "\n"


GOLDEN = {
    # fls (NAME+fls): 1->1, 2,3->2, 5,6->3, 8,12->4, 64,100->7, 1000->10; 2M 3->2, 4->3; 1G 2->2.
    "fls": HEADER
    + row("4K", {1: 1, 2: 2, 3: 2, 4: 2, 7: 2, 10: 1}, HEADS_4K)
    + row("2M", {2: 1, 3: 1}, HEADS_2M)
    + row("1G", {2: 1}, HEADS_1G),
    # ffs (NAME, and NAME+ffs, the same): odd -> 1 (1,3,5), 2,6->2, 8->4, 12,100->3, 64->7, 1000->4; 2M 3->1, 4->3; 1G 2->2.
    "ffs": HEADER
    + row("4K", {1: 3, 2: 2, 3: 2, 4: 2, 7: 1}, HEADS_4K)
    + row("2M", {1: 1, 3: 1}, HEADS_2M)
    + row("1G", {2: 1}, HEADS_1G),
}


def build_known_state(kernel: str, design: str | None = None) -> tuple[KvmHost, str]:
    kvm = new_vm("shadow", memory="128M", vcpus=1, design=design, kernel=kernel)
    host = kvm.host
    slot = next(s for s in kvm.arch.memslots if s.as_id == 0 and s.base_gfn == 0x100)
    spte = 8
    for level, lengths in ((1, LISTS_4K), (2, LISTS_2M), (3, LISTS_1G)):
        for number, length in enumerate(lengths):
            gfn = 0x200 + (number << (9 * (level - 1)))
            for _ in range(length):
                kvm.arch.rmaps.rmap_add(slot, gfn, level, spte)
                spte += 8
    return host, kvm.name


@pytest.mark.parametrize("design", ["A", "B", "C", "D"])
@pytest.mark.parametrize("kernel, bucket", [("latest", "ffs"), ("latest+ffs", "ffs"), ("latest+fls", "fls")])
def test_golden_text(kernel: str, bucket: str, design: str) -> None:
    host, name = build_known_state(kernel, design)
    assert cat(host.debugfs_dir, f"{name}/mmu_rmaps_stat") == GOLDEN[bucket]
    # The longest list was 1000 before its last add: the peak stat saw 999.
    assert cat(host.debugfs_dir, f"{name}/max_mmu_rmap_size") == "999\n"


@pytest.mark.parametrize("kernel, bucket", [("v5.15", "ffs"), ("v6.4", "ffs"), ("v5.15+fls", "fls"), ("v6.4+fls", "fls")])
def test_golden_text_for_the_kernels_own_designs(kernel: str, bucket: str) -> None:
    host, name = build_known_state(kernel)
    assert cat(host.debugfs_dir, f"{name}/mmu_rmaps_stat") == GOLDEN[bucket]


def test_clearing_max_mmu_rmap_size_then_growing_again() -> None:
    host, name = build_known_state("latest")
    kvm = host.find_vm(name)
    kvm.stat.max_mmu_rmap_size = 0
    slot = next(s for s in kvm.arch.memslots if s.as_id == 0 and s.base_gfn == 0x100)
    kvm.arch.rmaps.rmap_add(slot, 0x200 + 7, 1, 1 << 20)
    assert cat(host.debugfs_dir, f"{name}/max_mmu_rmap_size") == "64\n"


def test_vm_list_reports_the_designs_work() -> None:
    from kvmdbgfs.control.server import describe_vm

    host, name = build_known_state("latest", "A")
    described = describe_vm(host.find_vm(name), None)  # no QEMU process: a bare VM
    # Design A holds a list of n >= 2 entries in ceil(n / 3) three-slot descriptors.
    expected = sum(-(-n // 3) for n in LISTS_4K + LISTS_2M + LISTS_1G if n >= 2)
    assert (described["rmap_design"], expected) == ("A", 407)
    assert described["rmap_costs"]["allocs"] == described["live_descs"] == expected
    assert described["rmap_costs"]["desc_visits"] > described["rmap_costs"]["allocs"]
