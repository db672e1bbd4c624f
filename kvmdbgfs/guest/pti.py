"""Page-table isolation (arch/x86/mm/pti.c, the entry code's CR3 switches): a second top-level table per process.

With KPTI every process pgd has a user twin (kernel_to_user_pgdp: the second page of the pgd's order-1
allocation; here the second of the two pages pgd_alloc takes at once, paired in ``user_pgds``). User code runs on the user pgd, whose user
half is the process's own (every write of a user pgd entry goes to both, __pti_set_user_pgtbl) and whose
kernel half maps only the entry text; the kernel runs on the kernel pgd, whose present user entries are
made NX. The entry code switches between the two (SWITCH_TO_KERNEL_CR3 / SWITCH_TO_USER_CR3) with PCID's
no-flush bit, except when the user ASID was invalidated by a flush since the last return to user space.

Under shadow paging each pgd gets its own shadow root, and, since the NX of the kernel's user entries
gives different shadow-page roles below them, a user page that the kernel touches through its user
address (copy_to_user, put_user, ...) gets a second leaf spte: a second entry in its rmap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.guest.pgtable import KERNEL_PGD_BOUNDARY, KERNPG_TABLE, alloc_table_at
from kvmdbgfs.guest.pte import pt_index

if TYPE_CHECKING:
    from kvmdbgfs.guest.hardware import GuestHardware
    from kvmdbgfs.guest.kctx import KernelContext
    from kvmdbgfs.guest.kpgtable import KernelPageTables


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class PageTableIsolation:
    """The user pgd of every process pgd, and which vCPUs run on a user pgd now."""

    def __init__(self, hardware: GuestHardware) -> None:
        self.hw = hardware
        self.user_pgds: dict[int, int] = {}  # kernel pgd -> its user pgd (kernel_to_user_pgdp)
        self.init_user_pgd = -1  # init_mm's user pgd, once pti_init made it
        self.user_kernel_entries = np.zeros(KERNEL_PGD_BOUNDARY, np.uint64)  # init_mm's user pgd, 256..511
        self.entry_text = np.zeros(1, np.uint64)  # an address in the entry text
        self.on_user: dict[int, int] = {}  # vCPU -> the kernel pgd whose user twin it has loaded
        self.flush_pending: set[int] = set()  # vCPUs whose user ASID was invalidated (invalidate_user_asid)

    def pti_init(self, ctx: KernelContext, kpt: KernelPageTables) -> None:
        """pti_init + pti_clone_entry_text: init_mm's user pgd, whose kernel half maps the 2 MiB page of the
        entry text (pti_clone_pgtable: the kernel's PMD copied, global in both) through tables of its own."""
        user_pgd = self.init_user_pgd = ctx.alloc_table()
        entry_va = kpt.image_va
        kernel_pmd = alloc_table_at(ctx, kpt.pgd, entry_va, 2, KERNPG_TABLE)
        pmd = int(ctx.memory.table(kernel_pmd)[pt_index(entry_va, 2)])
        user_pmd = alloc_table_at(ctx, user_pgd, entry_va, 2, KERNPG_TABLE)
        ctx.store(user_pmd, pt_index(entry_va, 2), pmd)
        self.user_kernel_entries = ctx.memory.table(user_pgd)[KERNEL_PGD_BOUNDARY:].copy()
        self.entry_text = np.array([entry_va], np.uint64)

    def pgd_ctor(self, ctx: KernelContext, pgd: int, user_pgd: int) -> None:
        """``user_pgd`` (zeroed) becomes the user twin of a new process pgd: its kernel half is cloned from
        init_mm's user pgd."""
        ctx.stores(user_pgd, np.arange(KERNEL_PGD_BOUNDARY, 2 * KERNEL_PGD_BOUNDARY), self.user_kernel_entries)
        self.user_pgds[pgd] = user_pgd

    def pgd_free(self, pgd: int) -> list[int]:
        """pgd_free of a process pgd: its user twin goes with it."""
        assert pgd not in self.on_user.values(), "freeing a pgd whose user twin a vCPU still runs on"
        return [self.user_pgds.pop(pgd)]

    def to_kernel(self, cpu: int) -> None:
        """SWITCH_TO_KERNEL_CR3 on kernel entry (a no-op when the vCPU already runs on a kernel pgd)."""
        pgd = self.on_user.pop(cpu, None)
        if pgd is not None:
            self.hw.load_cr3(cpu, pgd, noflush=True)

    def to_user(self, cpu: int, pgd: int) -> None:
        """SWITCH_TO_USER_CR3 on the return to user space of a task whose pgd is ``pgd`` (loaded on ``cpu``):
        the user twin, flushing its ASID only if it was invalidated; the exit path's last instructions then
        run from the entry text through it."""
        if self.on_user.get(cpu) == pgd:
            return
        self.to_kernel(cpu)
        noflush = cpu not in self.flush_pending
        self.flush_pending.discard(cpu)
        self.hw.load_cr3(cpu, self.user_pgds[pgd], noflush=noflush)
        self.on_user[cpu] = pgd
        self.hw.access(cpu, self.entry_text, False, False, fetch=True)

    def invalidate_user_asid(self, cpu: int) -> None:
        """A flush on ``cpu`` covered the kernel ASID only: the next return to user space flushes the user's."""
        self.flush_pending.add(cpu)

