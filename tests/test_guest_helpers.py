"""Shared helpers of the guest-OS tests (no tests here): small guests on recording bare-metal hardware."""

from __future__ import annotations

import numpy as np

from kvmdbgfs.guest.distro import Program
from kvmdbgfs.guest.kernel import GuestKernel
from kvmdbgfs.guest.pgtable import table_at
from kvmdbgfs.guest.process import Task
from kvmdbgfs.guest.pte import pt_index
from kvmdbgfs.guest.recording import RecordingHardware, trace_signature

MiB = 1 << 20
# A process with just its executable, ld.so and the vDSO, and no heap: its own mappings are what a test makes.
BARE = Program("bare", "agetty", (), heap_kib=0, anon_kib=0, stack_kib=4, text_frac=0.0)
TEST_VA = 0x10000000  # PML4 0, far from what exec maps


def small_kernel(memory: int = 256 * MiB, seed: int = 1, batch: bool = True, nr_vcpus: int = 2) -> GuestKernel:
    return GuestKernel(memory, RecordingHardware(), np.random.default_rng(seed), nr_vcpus, batch=batch)


def bare_process(kernel: GuestKernel) -> Task:
    """A kernel thread exec'ing the bare program (as kernel_init execs init)."""
    task = kernel.kthread("test")
    kernel.exec(task, BARE)
    return task


def hw(kernel: GuestKernel) -> RecordingHardware:
    assert isinstance(kernel.hw, RecordingHardware)
    return kernel.hw


def same_state(a: GuestKernel, b: GuestKernel) -> None:
    """The two guests have the same memory, allocator and (up to commuting events) hardware history."""
    ta, tb = hw(a).memory._tables, hw(b).memory._tables
    assert ta.keys() == tb.keys()
    assert all((ta[gfn] == tb[gfn]).all() for gfn in ta)
    pa, pb = a.ctx.pages, b.ctx.pages
    assert pa.nr_free == pb.nr_free
    assert (pa._free.stack[: pa.nr_free] == pb._free.stack[: pb.nr_free]).all()
    assert (pa.refcount == pb.refcount).all() and (pa.kind == pb.kind).all()
    assert trace_signature(hw(a).events) == trace_signature(hw(b).events)


def next_frames(kernel: GuestKernel, n: int) -> list[int]:
    """The frames the allocator will hand out next, in order."""
    pages = kernel.ctx.pages
    return pages._free.stack[pages.nr_free - n : pages.nr_free][::-1].tolist()


def pte_table(kernel: GuestKernel, task: Task, va: int) -> int:
    """The PT page holding ``va``'s PTE in ``task`` (-1 if there is none)."""
    assert task.mm is not None
    return table_at(kernel.ctx, task.mm.pgd, va, 1)


def user_pte(kernel: GuestKernel, task: Task, va: int) -> int:
    """The PTE mapping ``va`` in ``task``'s page tables (0 if there is none)."""
    pt = pte_table(kernel, task, va)
    return 0 if pt < 0 else int(kernel.ctx.memory.table(pt)[pt_index(va, 1)])
