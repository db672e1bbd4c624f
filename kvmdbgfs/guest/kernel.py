"""GuestKernel: a Linux x86-64 guest as the hypervisor sees it, driven through a GuestHardware.

Boot builds the kernel page tables (kpgtable), hands memory to the page
allocator, touches the kernel image and the memmap, preallocates the vmalloc
PUDs and loads modules. Then tasks are created (fork, kernel threads), exec
programs, run on vCPUs (context switches load CR3), use memory and exit.
"""

from __future__ import annotations

from typing import Final

from dataclasses import dataclass

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.guest import exec as binfmt
from kvmdbgfs.guest import userspace
from kvmdbgfs.guest.allocator import PageAllocator
from kvmdbgfs.guest.distro import ELVES, PROGRAMS, Program
from kvmdbgfs.guest.fork import dup_mmap
from kvmdbgfs.guest.hardware import GuestHardware
from kvmdbgfs.guest.huge import THP_MODES
from kvmdbgfs.guest.kctx import KernelContext
from kvmdbgfs.guest.kpgtable import KernelPageTables
from kvmdbgfs.guest.mm import Mm, pgd_alloc, pgd_free
from kvmdbgfs.guest.pagecache import File, PageCache
from kvmdbgfs.guest.physmem import setup_memory
from kvmdbgfs.guest.process import LoadedElf, Task
from kvmdbgfs.guest.pti import PageTableIsolation
from kvmdbgfs.guest.slab import Slab
from kvmdbgfs.guest.teardown import FIRST_USER_ADDRESS, USER_PGTABLES_CEILING, unmap_region
from kvmdbgfs.guest.tlb import Tlb
from kvmdbgfs.guest.vaddr import PAGE_SIZE, STRUCT_PAGE_SIZE, TASK_SIZE, kernel_vas, vmemmap
from kvmdbgfs.guest.vma import PROT_READ, PROT_WRITE
from kvmdbgfs.guest.vmalloc import STACK_TOUCH_PAGES, KernelStacks, load_modules

MiB_PAGES = (1 << 20) // PAGE_SIZE
VDSO_PAGES: Final = 2
HOT_CODE_WINDOW: Final = 4  # pages (16 KiB) of code per hot window: running code touches one page in each
THREAD_STACK_SIZE: Final = 8 << 20  # glibc's default pthread stack (RLIMIT_STACK)


@dataclass(frozen=True)
class KernelConfig:
    """Build and boot parameters of the guest kernel."""

    text_mib: int = 16
    rodata_mib: int = 10
    data_mib: int = 10  # .data + .bss, after free_initmem
    module_kib: tuple[int, ...] = (64,) * 40 + (256,) * 12 + (1024,) * 3  # ~ 6 MiB of modules
    init_on_alloc: bool = True  # CONFIG_INIT_ON_ALLOC_DEFAULT_ON, as Ubuntu and Fedora build it
    slab_permille: int = 10  # slab caches filled during boot, per mille of RAM
    slab_objects_per_task: int = 8  # task_struct, cred, signal, files, fs, pid, ... per copy_process
    gbpages: bool = True
    thp: str = "madvise"  # transparent_hugepage/enabled, as Ubuntu sets it
    pti: bool = False  # page-table isolation (pti=on / pti=off on the kernel command line)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class GuestKernel:
    """The guest OS. ``batch`` selects the vectorised paths (one store_ptes per page-table page and step)."""

    def __init__(
        self,
        memory_bytes: int,
        hardware: GuestHardware,
        rng: np.random.Generator,
        nr_vcpus: int = 2,
        *,
        batch: bool = True,
        config: KernelConfig = KernelConfig(),
    ) -> None:
        if config.thp not in THP_MODES:
            raise ValueError(f"thp must be one of {THP_MODES}, not {config.thp!r}")
        self.rng = rng
        self.hw = hardware
        self.nr_vcpus = nr_vcpus
        self.config = config
        self.ctx = ctx = KernelContext(hardware, batch, config.init_on_alloc, config.thp)
        ctx.pti = PageTableIsolation(hardware) if config.pti else None
        text, rodata = config.text_mib * MiB_PAGES, config.rodata_mib * MiB_PAGES
        self.boot_memory = boot = setup_memory(memory_bytes, text + rodata + config.data_mib * MiB_PAGES)
        self.kpt = KernelPageTables(ctx, boot, text, rodata, config.gbpages)
        ctx.pages = PageAllocator(boot.max_pfn, boot.ram, boot.memblock.free_runs())
        self.kpt.after_bootmem = True
        image = boot.kernel_image[0]
        ctx.zero_pfn = image + text + rodata  # empty_zero_page, first page of .bss..page_aligned
        self.vdso = File("[vdso]", VDSO_PAGES)
        self.vdso.pages[:] = np.arange(image + text, image + text + VDSO_PAGES)  # vdso_image_64 in rodata
        ctx.pages.refcount[[ctx.zero_pfn, *self.vdso.pages]] = 1  # part of the kernel: never freed
        ctx.tlb = Tlb(hardware, nr_vcpus, self.kpt.pgd, ctx.pti)
        ctx.cache = self.cache = PageCache(ctx)
        self._boot_touch(image, text, rodata)
        self.kpt.preallocate_vmalloc()
        if ctx.pti is not None:
            ctx.pti.pti_init(ctx, self.kpt)
        self.kernel_entries = self.kpt.kernel_entries()
        self.stacks = KernelStacks(ctx, self.kpt, nr_vcpus)
        self.slab = Slab(ctx, rng, ctx.pages.managed_pages * config.slab_permille // 1000)
        self.modules = load_modules(
            ctx, self.kpt, [-(-kib // 4) for kib in config.module_kib], int(rng.integers(1, 1024))
        )  # module_load_offset (KASLR)
        self.files: dict[str, File] = {}
        self._text_ranks: dict[tuple[str, str], np.ndarray] = {}
        self.tasks: dict[int, Task] = {}
        self.children: dict[int, dict[int, Task]] = {}  # the live tasks whose parent has the pid, by their pid
        self.current: list[Task | None] = [None] * nr_vcpus
        self._next_pid = 1
        self._next_cpu = 0

    def _boot_touch(self, image: int, text: int, rodata: int) -> None:
        """start_kernel on the boot CPU: the image is executed and written, every struct page initialised."""
        image_va = kernel_vas(self.kpt.image_va, np.arange(text + rodata + self.config.data_mib * MiB_PAGES))
        self.ctx.kernel_access(image_va[:text], write=False, fetch=True)
        self.ctx.kernel_access(image_va[text : text + rodata], write=False)
        self.ctx.kernel_access(image_va[text + rodata :], write=True)
        per_page = PAGE_SIZE // STRUCT_PAGE_SIZE
        pfns = np.concatenate([np.arange(s - s % per_page, e, per_page) for s, e in self.boot_memory.ram])
        self.ctx.kernel_access(vmemmap(pfns), write=True)  # memmap_init_zone

    # -- files -----------------------------------------------------------------
    def file(self, name: str) -> File:
        """The page cache of an installed ELF object (created on first open)."""
        if name not in self.files:
            self.files[name] = File(name, ELVES[name].file_pages)
        return self.files[name]

    def hot_pages(self, obj: LoadedElf, segment: str, frac: float) -> np.ndarray:
        """The pages of a segment that running code touches: one page in each of the hottest windows of
        HOT_CODE_WINDOW pages. Which windows are hot is drawn once per object, so every process running it
        agrees; a process running ``frac`` of its code touches that share of the windows, hottest first."""
        pages = obj.pages(segment)
        key = (obj.elf.name, segment)
        if key not in self._text_ranks:
            windows = -(-len(pages) // HOT_CODE_WINDOW)
            offsets = self.rng.integers(HOT_CODE_WINDOW, size=windows)
            ranked = self.rng.permutation(windows)
            self._text_ranks[key] = np.minimum(ranked * HOT_CODE_WINDOW + offsets[ranked], max(len(pages) - 1, 0))
        chosen = self._text_ranks[key][: int(np.ceil(frac * len(self._text_ranks[key])))]
        return pages[np.sort(chosen)] if len(pages) else pages

    # -- scheduling ---------------------------------------------------------------
    def run(self, task: Task, cpu: int | None = None) -> KernelContext:
        """context_switch to ``task`` on ``cpu`` (default: where it last ran): switch_mm (CR3) or lazy TLB for
        a kernel thread, then switch_to writes the top of its kernel stack."""
        cpu = task.cpu if cpu is None else cpu
        self.ctx.cpu = cpu
        if self.current[cpu] is task:
            return self.ctx
        if task in self.current:  # migrating: it leaves the other vCPU idle
            self.idle(self.current.index(task))
            self.ctx.cpu = cpu
        if task.mm is not None:
            self.ctx.tlb.switch_mm(cpu, task.mm)
        else:
            self.ctx.tlb.enter_lazy_tlb(cpu)
        self.current[cpu] = task
        task.cpu = cpu
        self.ctx.kernel_access(self.stacks.gvas(task.stack, STACK_TOUCH_PAGES), write=True)
        return self.ctx

    def enter(self, task: Task) -> KernelContext:
        """The kernel acts on behalf of ``task``: it must be running, so switch to it if needed."""
        if task.pid not in self.tasks:
            raise ValueError(f"task {task.pid} ({task.comm}) has exited")
        return self.run(task)

    def compute(self, task: Task, ms: float) -> None:
        """``task`` runs its own code for ``ms`` of CPU time on its CPU: nothing the MMU sees, only time."""
        ctx = self.enter(task)
        self.hw.execute(ctx.cpu, int(ms * 1_000_000))

    def idle(self, cpu: int) -> None:
        """The vCPU runs its idle task: the last mm stays loaded, lazily."""
        self.current[cpu] = None
        self.ctx.tlb.enter_lazy_tlb(cpu)

    def _pick_cpu(self) -> int:
        """select_task_rq for a new task: the vCPUs in turn."""
        cpu = self._next_cpu
        self._next_cpu = (cpu + 1) % self.nr_vcpus
        return cpu

    # -- task lifetime -------------------------------------------------------------
    def _new_task(self, comm: str, mm: Mm | None, parent: Task | None) -> Task:
        """copy_process: a pid, a kernel stack (dup_task_struct) and the task's slab objects."""
        self.slab.touch(self.config.slab_objects_per_task)
        task = Task(
            self,
            self._next_pid,
            comm,
            mm,
            self.stacks.alloc(),
            self._pick_cpu(),
            parent,
            parent.program if parent else "",
        )
        self._next_pid += 1
        self.tasks[task.pid] = task
        if parent is not None:
            self.children.setdefault(parent.pid, {})[task.pid] = task
        return task

    def kthread(self, comm: str) -> Task:
        """kthread_create: a task without an mm."""
        return self._new_task(comm, None, None)

    def fork(self, parent: Task) -> Task:
        """kernel_clone: a new task with a copy of the parent's address space (dup_mm). Out of memory on the
        way, copy_process's error path (bad_fork_cleanup_*) frees what the child got, its mm, kernel stack
        and pid; the child never ran."""
        ctx = self.enter(parent)
        mm = None
        if parent.mm is not None:
            mm = Mm(pgd_alloc(ctx, self.kernel_entries))
        try:
            child = self._new_task(parent.comm, mm, parent)
        except MemoryError:  # dup_task_struct found no kernel stack
            if mm is not None:
                self.mmput(mm)
            raise
        child.objects = list(parent.objects)  # the same executable and libraries stay mapped
        if parent.mm is not None and mm is not None:
            try:
                dup_mmap(ctx, parent.mm, mm)
            except MemoryError:
                self.mmput(mm)
                self._free_task(child)
                raise
        return child

    def exec(self, task: Task, program: str | Program) -> None:
        """execve of a program from distro.PROGRAMS (or a Program), which then starts up (userspace.start_main).
        de_thread first makes the caller the only thread."""
        program = PROGRAMS[program] if isinstance(program, str) else program
        if task.mm is not None:
            for thread in self.threads(task):
                self.exit_thread(thread)
        binfmt.execve(self, task, program)
        userspace.start_main(task, program)

    def boot(self, logins: int = 1) -> userspace.Userspace:
        """Bring the guest to an idle multi-user system with ``logins`` SSH logins (see userspace.boot)."""
        return userspace.boot(self, logins=logins)

    def spawn(self, program: str | Program, parent: Task) -> Task:
        """fork + exec, as a shell or systemd starts a program; a child whose exec runs out of memory exits."""
        child = self.fork(parent)
        try:
            self.exec(child, program)
        except MemoryError:
            self.exit(child)
            raise
        return child

    def mmput(self, mm: Mm) -> None:
        """The last user of ``mm`` is gone: exit_mmap (zap, free_pgtables, flush, free), then mmdrop's pgd_free."""
        unmap_region(self.ctx, mm, list(mm.vmas), 0, TASK_SIZE, FIRST_USER_ADDRESS, USER_PGTABLES_CEILING, fullmm=True)
        mm.remove(list(mm.vmas))
        for cpu in self.ctx.tlb.loaded_on(mm):
            self.ctx.tlb.switch_to_init_mm(cpu)
        pgd_free(self.ctx, mm.pgd)

    def clone_thread(self, task: Task) -> Task:
        """pthread_create: mmap a thread stack (allocate_stack), then clone(CLONE_VM): a task sharing the mm."""
        self.enter(task)
        stack = task.mmap(THREAD_STACK_SIZE, PROT_READ | PROT_WRITE, name="[thread stack]")
        assert task.mm is not None
        thread = self._new_task(task.comm, task.mm, task)
        task.mm.users += 1
        thread.thread_stack_top = stack.end
        return thread

    def threads(self, task: Task) -> list[Task]:
        """The other tasks sharing ``task``'s mm (its thread group), by pid."""
        if task.mm is not None and task.mm.users == 1:  # mm_users counts the group: no other to look for
            return []
        return [other for other in self.tasks.values() if other.mm is task.mm and other is not task]

    def exit(self, task: Task) -> None:
        """exit_group: the other threads exit first, then ``task``; the last one out tears the mm down."""
        if task.mm is not None:
            for thread in self.threads(task):
                self.exit_thread(thread)
        self.exit_thread(task)

    def exit_thread(self, task: Task) -> None:
        """do_exit of one thread (pthread_exit): exit_mm (lazy TLB; the last user tears the mm down), the vCPU
        goes idle, the kernel stack is released, children are reparented to init."""
        ctx = self.enter(task)
        cpu = ctx.cpu
        if task.mm is not None:
            mm, task.mm = task.mm, None
            ctx.tlb.enter_lazy_tlb(cpu)
            mm.users -= 1
            if mm.users == 0:
                self.mmput(mm)
        self.current[cpu] = None
        self._free_task(task)
        init = self.tasks.get(1)
        for other in self.children.pop(task.pid, {}).values():
            other.parent = init
            if init is not None:
                self.children.setdefault(init.pid, {})[other.pid] = other

    def _free_task(self, task: Task) -> None:
        """free_task: the kernel stack goes back (free_thread_stack), and the pid."""
        self.stacks.free(task.stack)
        del self.tasks[task.pid]
        if task.parent is not None:
            self.children[task.parent.pid].pop(task.pid)

    # -- stats -----------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Page and task counts: pages by use, page-table pages, page cache, processes and kernel threads."""
        pages = self.ctx.pages
        counts = {f"pages_{name}": n for name, n in pages.count_by_kind().items()}
        counts.update(
            pages_managed=pages.managed_pages,
            pages_allocated=pages.managed_pages - pages.nr_free,
            processes=len({id(t.mm) for t in self.tasks.values() if t.mm is not None}),
            user_threads=sum(not t.is_kthread for t in self.tasks.values()),
            kernel_threads=sum(t.is_kthread for t in self.tasks.values()),
        )
        return counts
