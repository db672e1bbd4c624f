"""A booted 1 GiB shadow guest with one vCPU and no page-table isolation: the shadow-page limit the kernel
computes for it, rmap_fork at the recycle threshold, and the remote flushes of a lone vCPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from inprocess import cat
from test_workloads import running_vmm

from kvmdbgfs.vmm.qemu import QemuProcess
from kvmdbgfs.workloads import run_workload


@pytest.fixture(scope="module")
def guest() -> Iterator[QemuProcess]:
    """`idle` on a 1 GiB shadow guest with one vCPU, pti off (a small population: one login, no web server)."""
    with running_vmm(seed=3) as vmm:
        vm = vmm.create_vm(vmm.host.make_config(memory="1G", vcpus=1, mmu="shadow", seed=3))
        run_workload(vm, "idle", {"uptime": 5, "workers": 0, "logins": 1, "pti": 0})
        yield vm


def stat(vm: QemuProcess, name: str) -> int:
    return int(cat(vm.kvm.host.debugfs_dir, f"{vm.name}/{name}"))


def test_one_vcpu_requests_remote_flushes_but_never_kicks_another(guest: QemuProcess) -> None:
    """kvm_make_all_cpus_request() IPIs only vCPUs in guest mode other than the requester's pCPU: with one
    vCPU, every request comes from it (or from the host while it may run guest code: none here)."""
    assert stat(guest, "remote_tlb_flush") < stat(guest, "remote_tlb_flush_requests")
    assert stat(guest, "remote_tlb_flush") == 0


def test_the_limit_is_one_page_per_50_of_both_address_spaces(guest: QemuProcess) -> None:
    slots = guest.kvm.arch.memslots
    pages = sum(slot.npages for slot in slots)
    assert {slot.as_id for slot in slots} == {0, 1}
    assert guest.kvm.arch.mmu.n_max_mmu_pages == max(pages // 50, 64) == 10651


def test_rmap_fork_1000_reaches_the_recycle_threshold_without_zapping_for_room(guest: QemuProcess) -> None:
    """1000 children each map the shared pages once more: lists reach 1001 entries (the pre-insert count that
    triggers no recycle, RMAP_RECYCLE_THRESHOLD 1000), and the shadow pages stay under the limit."""
    recycled = stat(guest, "mmu_recycled")
    run_workload(guest, "rmap_fork", {"children": 1000})
    assert (stat(guest, "max_mmu_rmap_size"), stat(guest, "mmu_recycled") - recycled) == (1001, 0)
