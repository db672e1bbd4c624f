"""Workloads finish or leave nothing behind (issue 11), in-process: cancelled at a safe point, a guest out of
memory, a destroyed VM; and a workload whose waiter went away runs to its end as if it had been waited for.

"Every page it allocated is freed", precisely: the guest's pages are first checked to be all accounted for
(``guest_pages``: every page-table page reachable from a live mm, a THP deposit or the kernel's tables,
every anonymous page referenced exactly once per PTE mapping it, every page-cache page held by its file
and its mappings, every kernel page a slab, module, kernel stack or memmap page). Then anonymous memory,
user page tables and the kernel's pages (slab, stacks) must be back to what they were before the
workload; the workload's tasks must be gone. What may stay, as in Linux: page cache its programs read
(the workloads here ran once before, so their files are cached and it does not even grow), kernel stacks
parked in a CPU's cache of free stacks (NR_CACHED_STACKS, counted apart), and page tables of the kernel's
vmalloc area, which Linux never frees (they can only grow).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import wait_until
from inprocess import cat, walk_files
from mmu_testlib import check_invariants
from test_workloads import on_vcpu_thread

from kvmdbgfs.guest.allocator import HPAGE_PMD_NR, PAGE_ANON, PAGE_CACHE, PAGE_KERNEL, PAGE_TABLE
from kvmdbgfs.guest.huge import is_huge
from kvmdbgfs.guest.kernel import GuestKernel
from kvmdbgfs.guest.pgtable import present_indices, ptes_gfn, table_at, walk
from kvmdbgfs.guest.pte import PT64_ENT_PER_PAGE, pte_gfn
from kvmdbgfs.guest.vaddr import PAGE_OFFSET, PAGE_SIZE, PMD_SIZE, TASK_SIZE
from kvmdbgfs.guest.vmalloc import THREAD_SIZE_PAGES
from kvmdbgfs.vmm.qemu import QemuProcess, WorkloadJob
from kvmdbgfs.vmm.vmm import Vmm
from kvmdbgfs.workloads import run_workload, start_workload, wait_workload
from kvmdbgfs.workloads.hotplug import dimm_slot
from kvmdbgfs.workloads.memhog import MEMHOG
from kvmdbgfs.workloads.rmap_fork import RMAP_FORK
from kvmdbgfs.workloads.teardown import TORN_DOWN

SEED = 12
SECOND = 1_000_000_000
BOOT = {"uptime": 0, "workers": 4, "logins": 1}
KERNEL_HALF = (1 << 47, 1 << 48)  # PML4 entries 256..511, as the guest's page-table walk numbers them
PUD_SIZE = 1 << 30


# -- the guest's pages, all accounted for ---------------------------------------------------------------
def user_tables_and_mappings(kernel: GuestKernel) -> tuple[list[int], list[np.ndarray]]:
    """Every user page-table page of the live address spaces (pgd, tables below it, THP deposits), and the
    frames their PTEs and huge PMDs map, one entry per mapping."""
    ctx, tables, mapped = kernel.ctx, [], []
    for mm in {id(task.mm): task.mm for task in kernel.tasks.values() if task.mm is not None}.values():
        tables += [mm.pgd, *mm.deposited.values()]
        if ctx.pti is not None:
            tables.append(ctx.pti.user_pgds[mm.pgd])  # its page-table isolation twin
        for level, _, table, index in walk(ctx, mm.pgd, 0, TASK_SIZE):
            entry = ctx.memory.table(table).item(index)
            if level == 2 and is_huge(entry):
                mapped.append(np.arange(pte_gfn(entry), pte_gfn(entry) + HPAGE_PMD_NR))
                continue
            tables.append(pte_gfn(entry))
            if level == 2:
                ptes = ctx.memory.table(pte_gfn(entry))
                mapped.append(ptes_gfn(ptes[present_indices(ptes, 0, PT64_ENT_PER_PAGE)]))
    return tables, mapped


def kernel_tables(kernel: GuestKernel) -> list[int]:
    """The kernel's page-table pages below the PML4 (those from memblock are reserved pages, not counted)."""
    ctx = kernel.ctx
    pgds = [kernel.kpt.pgd] if ctx.pti is None else [kernel.kpt.pgd, ctx.pti.init_user_pgd]
    below = [
        pte_gfn(ctx.memory.table(table).item(index))
        for pgd in pgds
        for level, _, table, index in walk(ctx, pgd, *KERNEL_HALF)
        if not (level == 2 and is_huge(ctx.memory.table(table).item(index)))
    ]
    return below + pgds[1:]  # init_mm's user pgd comes from the page allocator, init_top_pgt from the image


def guest_pages(kernel: GuestKernel) -> dict[str, Any]:
    """The guest's pages by use, after checking that each one is accounted for (AssertionError if not)."""
    pages = kernel.ctx.pages
    user, mapped = user_tables_and_mappings(kernel)
    reachable = np.unique(np.array(user + kernel_tables(kernel)))
    assert np.array_equal(np.flatnonzero(pages.kind == PAGE_TABLE), reachable[pages.kind[reachable] == PAGE_TABLE])
    mapcount = np.bincount(np.concatenate(mapped), minlength=len(pages.kind))
    mapcount[kernel.ctx.zero_pfn] = 0  # the zero page is never counted
    anon = np.flatnonzero(pages.kind == PAGE_ANON)
    assert (pages.refcount[anon] == mapcount[anon]).all()
    cache = np.flatnonzero(pages.kind == PAGE_CACHE)
    files = np.concatenate([file.pages[file.pages >= 0] for file in kernel.cache.inodes])
    assert np.array_equal(np.sort(files), cache) and (pages.refcount[cache] == 1 + mapcount[cache]).all()
    modules = sum(-(-kib // 4) for kib in kernel.config.module_kib)
    cached_stacks = THREAD_SIZE_PAGES * sum(va is not None for cpu in kernel.stacks.cache for va in cpu)
    stacks = THREAD_SIZE_PAGES * len(kernel.stacks.pages)
    memmap = HPAGE_PMD_NR * len(kernel.kpt.hotplug_memmap)
    assert np.count_nonzero(pages.kind == PAGE_KERNEL) == len(kernel.slab.pages) + modules + stacks + memmap
    user_tables = len(np.unique(user))
    return {
        "anon": len(anon),
        "user page tables": user_tables,
        "kernel pages": len(kernel.slab.pages) + stacks - cached_stacks + memmap,
        "tasks": sorted(kernel.tasks),
        "page cache": len(cache),
        "kernel page tables": len(reachable) - user_tables,
    }


def must_return(before: dict[str, Any], after: dict[str, Any], grown: tuple[str, ...] = ()) -> None:
    """What a workload that ended early must have given back; the kernel's own page tables may only grow,
    and so may the uses named in ``grown`` (what the rest of the guest did meanwhile)."""
    for key in ("kernel page tables", *grown):
        assert after[key] >= before[key], key
    mine = {"anon", "user page tables", "kernel pages", "tasks", "page cache"} - set(grown)
    assert {key: after[key] for key in mine} == {key: before[key] for key in mine}


def settled_pages(vm: QemuProcess) -> dict[str, Any]:
    """guest_pages of a VM with no workload running (the manual clock keeps its guest still)."""
    assert vm.caught_up(0) and vm.guest is not None
    return guest_pages(vm.guest.kernel)


# -- stopping a workload at a chosen safe point -------------------------------------------------------------
def stop_at(
    vm: QemuProcess, monkeypatch: pytest.MonkeyPatch, name: str, settings: dict, step: int, stop: Callable[[], Any]
) -> tuple[WorkloadJob, Any]:
    """Queue a workload; when it reaches its safe point ``step``, call ``stop`` (cancel_workload, destroy_vm)
    on another thread and let the workload go on once the stop was asked for, so that it takes effect right
    there. Returns the job, ended, and what ``stop`` returned."""
    checkpoint = vm._checkpoint
    reached, answer = threading.Event(), []

    def gated(job: WorkloadJob, done: int, total: int, idle_ns: int) -> None:
        if done == step and not reached.is_set():
            reached.set()
            wait_until(lambda: job.cancel is not None, timeout=120)
        checkpoint(job, done, total, idle_ns)

    monkeypatch.setattr(vm, "_checkpoint", gated)
    job = start_workload(vm, name, settings)
    assert reached.wait(120), f"{name} never reached step {step}"
    stopper = threading.Thread(target=lambda: answer.append(stop()))
    stopper.start()
    stopper.join(120)
    assert job.done.wait(120) and answer
    monkeypatch.undo()
    return job, answer[0]


def cancel_at(vm: QemuProcess, monkeypatch: pytest.MonkeyPatch, name: str, settings: dict, step: int) -> WorkloadJob:
    """Cancel a workload at its safe point ``step``; the job, ended with the cancel's one-line error."""
    job, stopped = stop_at(vm, monkeypatch, name, settings, step, vm.cancel_workload)
    assert stopped == name
    assert job.result is None and job.error == f"workload {name} on VM {vm.name} was cancelled"
    return job


# -- twin VMs: the same seed and commands, one of them with clients that went away ---------------------------
COMMANDS = (("idle", BOOT), ("rmap_fork", {"children": 50}), ("memhog", {"size": "8M"}))


@dataclass
class Twin:
    vmm: Vmm
    vm: QemuProcess
    tree: dict[str, str]


def client_went_away(done: int, total: int, idle_ns: int = 0) -> None:
    raise BrokenPipeError("the client disconnected")


def make_twin(monkeypatch: pytest.MonkeyPatch, interrupted: bool) -> Twin:
    """A VM running COMMANDS. ``interrupted``: its boot is cancelled (which takes effect once the system is up,
    at the first safe point after the boot, where an idle workload with no uptime ends anyway); the client
    of rmap_fork disconnects, the one of memhog stops waiting. The tree is read once all of it has run and
    the host clock is a second past the VM's guest time."""
    vmm = Vmm(seed=SEED)
    vm = vmm.create_vm(vmm.host.make_config(memory="256M", vcpus=2, mmu="tdp-legacy", seed=SEED))
    if interrupted:
        (idle, boot), (rmap_fork, forks), (memhog, hog) = COMMANDS
        assert cancel_at(vm, monkeypatch, idle, boot, 1).progress == (1, 1)
        with pytest.raises(BrokenPipeError):
            wait_workload(start_workload(vm, rmap_fork, forks), client_went_away)
        with pytest.raises(TimeoutError):
            wait_workload(start_workload(vm, memhog, hog), timeout=0)
    else:
        for name, settings in COMMANDS:
            run_workload(vm, name, settings)
    vmm.advance_clock(0)  # returns once the VM has run all it was given
    vmm.advance_clock(vm.created_ns + vm.guest_ns - vmm.clock.now_ns() + SECOND)
    root = vmm.host.debugfs_dir
    return Twin(vmm, vm, {path: cat(root, path) for path in walk_files(root)})


@pytest.fixture(scope="module")
def twins() -> Iterator[tuple[Twin, Twin]]:
    """Two hosts with the same seed, each a 256 MiB VM (EPT over the shadow MMU: the quickest to boot) given
    COMMANDS: the first interrupted (its VM is the one the other tests use), the second not."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        pair = make_twin(monkeypatch, interrupted=True), make_twin(monkeypatch, interrupted=False)
    try:
        yield pair
    finally:
        for twin in pair:
            twin.vmm.shutdown()


@pytest.fixture
def vm(twins: tuple[Twin, Twin]) -> QemuProcess:
    """The first twin's VM, which the tests below share in file order: the hotplug and huge page tests need a
    free 2 MiB block, so they come before those that run the guest out of memory (they leave the allocator's
    fresh blocks broken up)."""
    return twins[0].vm


def test_clients_that_went_away_leave_the_same_tree(twins: tuple[Twin, Twin]) -> None:
    interrupted, waited = twins
    assert interrupted.vm.name == waited.vm.name and len(interrupted.tree) > 100
    assert interrupted.tree == waited.tree


def test_a_cancelled_boot_leaves_the_system_up(vm: QemuProcess) -> None:
    assert vm.guest is not None
    apache = [task for task in vm.guest.kernel.tasks.values() if task.comm == "apache2"]
    assert len(apache) == 1 + BOOT["workers"]


# -- cancel ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "settings", "step", "small"),
    [
        ("rmap_fork", {"children": 40}, 20, {"children": 10}),  # 19 of 40 children forked and sleeping
        ("kbuild", {"files": 12, "jobs": 2}, 2, {"files": 1}),  # make, and the first wave of compiles
        ("memhog", {"size": "16M", "keep": 1}, 1, {"size": "4M"}),  # all written (its one safe point), kept
    ],
)
def test_cancel_takes_back_every_process_and_page(
    vm: QemuProcess, monkeypatch: pytest.MonkeyPatch, name: str, settings: dict, step: int, small: dict
) -> None:
    run_workload(vm, name, small)  # its files are in the page cache
    before = settled_pages(vm)
    job = cancel_at(vm, monkeypatch, name, settings, step)
    assert job.progress[0] == step
    with pytest.raises(ValueError, match=f"^workload {name} on VM {vm.name} was cancelled$"):
        wait_workload(job)
    must_return(before, settled_pages(vm))


def test_cancel_without_a_workload_is_a_lookup_error(vm: QemuProcess) -> None:
    with pytest.raises(LookupError, match=f"^no workload is running on VM {vm.name}$"):
        vm.cancel_workload()


def test_queued_workloads_run_after_a_cancelled_one(vm: QemuProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    queued: list[WorkloadJob] = []
    original = vm._checkpoint

    def queue_one(job: WorkloadJob, done: int, total: int, idle_ns: int) -> None:
        if not queued:
            queued.append(start_workload(vm, "rmap_fork", {"children": 10}))
        original(job, done, total, idle_ns)

    monkeypatch.setattr(vm, "_checkpoint", queue_one)
    cancel_at(vm, monkeypatch, "rmap_fork", {"children": 40}, 5)
    assert wait_workload(queued[0], timeout=120)["workload"] == "rmap_fork"


def test_hotplug_cancelled_unmaps_its_buffers_and_unplugs(vm: QemuProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"size": "128M", "use": "16M", "rounds": 3}
    slots = list(vm.kvm.arch.memslots)
    before = settled_pages(vm)
    cancel_at(vm, monkeypatch, "hotplug", settings, 1)  # the first round done: the DIMM out, the buffers moved
    assert vm.kvm.arch.memslots == slots and vm.guest.kernel.ctx.pages.movable is None
    assert not [vma for task in vm.guest.services for vma in task.mm.vmas if vma.name == "[anon:dimm]"]
    # The guest ran 10 s of its life meanwhile, its daemons faulting in more of their heaps: every anonymous
    # page is still one that a live mapping holds (guest_pages), none is a buffer's (no [anon:dimm] left).
    must_return(before, settled_pages(vm), grown=("anon", "user page tables"))


# -- a guest out of memory ------------------------------------------------------------------------------------
def test_a_huge_page_fault_without_a_table_to_deposit_frees_the_huge_page(vm: QemuProcess) -> None:
    """do_huge_pmd_anonymous_page gets its THP, then finds no page to deposit: VM_FAULT_OOM, the THP freed."""
    kernel = vm.guest.kernel
    pages = kernel.ctx.pages

    def fault_with_only_a_huge_page_free(vm: QemuProcess) -> Any:
        task = kernel.spawn(MEMHOG, vm.guest.session[-1])
        region = task.mmap(4 * PMD_SIZE, name="memhog")
        task.madvise_hugepage(region.start, 4 * PMD_SIZE)
        first = -(-region.start // PMD_SIZE) * PMD_SIZE
        first += PMD_SIZE if (first + PMD_SIZE) % PUD_SIZE == 0 else 0  # both faults under one PD page
        task.touch(first, first + PAGE_SIZE, write=True)  # the PD page the next fault needs
        block = pages.alloc_huge(PAGE_ANON)
        if block < 0:
            return "no free 2 MiB block to begin with"
        taken = ballast(vm, 0)
        pages.put_huge(block)  # the only free memory: one 2 MiB block
        try:
            task.touch(first + PMD_SIZE, first + PMD_SIZE + PAGE_SIZE, write=True)
        except MemoryError as exc:
            return exc
        finally:
            pages.free(taken)
            kernel.exit(task)

    before = settled_pages(vm)
    failed = on_vcpu_thread(vm, fault_with_only_a_huge_page_free)
    assert isinstance(failed, MemoryError), failed
    must_return(before, settled_pages(vm))


def test_out_of_memory_is_one_line_after_the_teardown(vm: QemuProcess) -> None:
    run_workload(vm, "rmap_fork", {"children": 10})
    before = settled_pages(vm)
    free = vm.guest.kernel.stats()["pages_free"]
    with pytest.raises(ValueError) as error:
        run_workload(vm, "rmap_fork", {"children": 10, "size": 2 * free * 4096})
    message = str(error.value)
    assert message.startswith("guest out of memory: ") and message.endswith(f"({TORN_DOWN})") and "\n" not in message
    must_return(before, settled_pages(vm))
    check_invariants(vm.kvm)
    run_workload(vm, "rmap_fork", {"children": 10})  # the VM runs on


def test_out_of_memory_while_forking(vm: QemuProcess) -> None:
    """The shared area leaves room for a few children only: a fork runs out of memory half-way."""
    run_workload(vm, "rmap_fork", {"children": 10})
    before = settled_pages(vm)
    room = (vm.guest.kernel.stats()["pages_free"] - 300) * 4096
    with pytest.raises(ValueError, match=r"^guest out of memory: .*torn down\)$"):
        run_workload(vm, "rmap_fork", {"children": 1000, "size": room})
    must_return(before, settled_pages(vm))


def ballast(vm: QemuProcess, free: int) -> np.ndarray:
    """Allocate all but ``free`` of the guest's free pages (user memory: the allocator then has no free 2 MiB
    block left either)."""
    pages = vm.guest.kernel.ctx.pages
    return pages.alloc(pages.nr_free - free, PAGE_ANON)


def ballast_leaving_no_block(vm: QemuProcess, free: int) -> np.ndarray:
    """Allocate every free page, then free ``free`` of them again: they go back to the free lists, and no fresh
    memory nor free THP block is left, so there is no free 2 MiB block whatever the tests before did (ballast()
    leaves one when the unmovable free list holds fewer than ``free`` pages)."""
    pages = vm.guest.kernel.ctx.pages
    taken = pages.alloc(pages.nr_free, PAGE_ANON)
    pages.free(taken[len(taken) - free :])
    return taken[: len(taken) - free]


def with_free_pages(vm: QemuProcess, free: int, step: Callable[[GuestKernel], Any]) -> Any:
    """``step`` run on the guest (on its vCPU thread) while only ``free`` pages are free: its value, or the
    MemoryError it raised."""

    def run(vm: QemuProcess) -> Any:
        kernel = vm.guest.kernel
        taken = ballast(vm, free)
        try:
            return step(kernel)
        except MemoryError as exc:
            return exc
        finally:
            kernel.ctx.pages.free(taken)

    return on_vcpu_thread(vm, run)


@pytest.mark.parametrize("call", ["fork", "spawn"])
def test_fork_and_spawn_out_of_memory_at_every_step_leave_nothing(vm: QemuProcess, call: str) -> None:
    """With 0, 1, 2, ... pages free, until it succeeds: each failure, wherever it falls in copy_process, exec
    or the program's start-up, leaves every page accounted for and nothing of the new task."""
    kernel = vm.guest.kernel
    shell = vm.guest.session[-1]
    parent = on_vcpu_thread(vm, lambda vm: kernel.spawn(RMAP_FORK, shell))
    start = {"fork": lambda kernel: kernel.fork(parent), "spawn": lambda kernel: kernel.spawn(RMAP_FORK, shell)}[call]
    before = settled_pages(vm)
    failures = 0
    for free in range(1000):
        task = with_free_pages(vm, free, start)
        if not isinstance(task, MemoryError):
            break
        failures += 1
        must_return(before, settled_pages(vm))
    on_vcpu_thread(vm, lambda vm: (kernel.exit(task), kernel.exit(parent)))
    assert failures > {"fork": 5, "spawn": 40}[call]


def test_a_dimm_the_guest_cannot_add_leaves_nothing(vm: QemuProcess) -> None:
    """No free 2 MiB block for the DIMM's memmap: the guest takes its direct map down again, QEMU deletes the
    memslots."""
    slots = list(vm.kvm.arch.memslots)
    before = settled_pages(vm)
    taken = on_vcpu_thread(vm, lambda vm: ballast_leaving_no_block(vm, 4096))
    with pytest.raises(ValueError) as error:
        run_workload(vm, "hotplug", {"size": "128M", "use": "0", "rounds": 1})
    assert str(error.value) == f"vmemmap_populate: no free 2 MiB block for the memmap ({TORN_DOWN})"
    on_vcpu_thread(vm, lambda vm: vm.guest.kernel.ctx.pages.free(taken))
    assert vm.kvm.arch.memslots == slots and not vm.guest.kernel.kpt.hotplug_memmap
    kernel = vm.guest.kernel
    direct_map = PAGE_OFFSET + dimm_slot(vm, 128 << 20).start * PAGE_SIZE
    assert table_at(kernel.ctx, kernel.kpt.pgd, direct_map, 2) < 0  # no PD (nor 1G page) maps it
    must_return(before, settled_pages(vm))


def test_a_guest_that_runs_out_of_memory_booting_has_panicked() -> None:
    vmm = Vmm(seed=SEED)
    try:
        vm = vmm.create_vm(vmm.host.make_config(memory="64M", vcpus=2, mmu="tdp-legacy", seed=SEED))
        with pytest.raises(ValueError, match=r"^guest out of memory: .* while booting: the guest panicked"):
            run_workload(vm, "idle", BOOT)
        for name, settings in (("idle", BOOT), ("rmap_fork", {})):
            with pytest.raises(ValueError, match=f"^the guest of VM {vm.name} panicked while booting"):
                run_workload(vm, name, settings)
    finally:
        vmm.shutdown()


# -- a destroyed VM ---------------------------------------------------------------------------------------------
def test_destroying_a_vm_tears_its_workload_down_and_refuses_new_ones(
    twins: tuple[Twin, Twin], monkeypatch: pytest.MonkeyPatch
) -> None:
    twin = twins[1]  # the other tests use the first
    vm = twin.vm
    before = settled_pages(vm)
    job, _ = stop_at(vm, monkeypatch, "rmap_fork", {"children": 100}, 30, lambda: twin.vmm.destroy_vm(vm.name))
    assert job.error == f"VM {vm.name} was destroyed: the workload stopped"
    must_return(before, guest_pages(vm.guest.kernel))
    with pytest.raises(LookupError, match="is destroyed: it runs no more workloads"):
        start_workload(vm, "rmap_fork", {"children": 10})
    with pytest.raises(LookupError):
        twin.vmm.find_vm(vm.name)
