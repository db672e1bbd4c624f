"""execve (fs/exec.c, binfmt_elf) and what the dynamic loader then does to the new address space.

The new mm is built before the old one is dropped: its stack gets the
argument pages through get_user_pages (stores into the new tables while the
old CR3 is still loaded), exec_mmap switches CR3 and tears the old mm down,
load_elf_binary maps the executable, brk, the interpreter and the vDSO. Then
ld.so maps each library (read the ELF header, map the segments), relocates
(writes RELRO and data: COW faults), mprotects RELRO read-only and the
program runs its start-up code (text faults with fault-around).
"""

from __future__ import annotations

from typing import Final, TYPE_CHECKING

import numpy as np

from kvmdbgfs.guest import fault
from kvmdbgfs.guest.distro import ELVES, LD_SO, Elf, Program
from kvmdbgfs.guest.mm import Mm, pgd_alloc
from kvmdbgfs.guest.pagecache import File
from kvmdbgfs.guest.process import LoadedElf, Task
from kvmdbgfs.guest.vaddr import PAGE_SIZE
from kvmdbgfs.guest.vma import PROT_EXEC, PROT_READ, PROT_WRITE, Vma

if TYPE_CHECKING:
    from kvmdbgfs.guest.kernel import GuestKernel

STACK_INIT_PAGES: Final = 33  # setup_arg_pages: the argument pages plus stack_guard/128 KiB of expansion
ARG_PAGES: Final = 2  # argv, envp and auxv strings
RODATA_FRAC: Final = 0.5  # share of the text fraction applied to rodata


def map_elf(task: Task, elf: Elf, file: File, base: int) -> LoadedElf:
    """elf_map / _dl_map_segments: one VMA per segment from ``base`` (file-backed, bss anonymous)."""
    segments = [
        ("head", elf.head, PROT_READ),
        ("text", elf.text, PROT_READ | PROT_EXEC),
        ("rodata", elf.rodata, PROT_READ),
        ("relro", elf.relro, PROT_READ | PROT_WRITE),
        ("data", elf.data, PROT_READ | PROT_WRITE),
    ]
    vmas = {}
    va, pgoff = base, 0
    for name, npages, prot in segments:
        if npages:
            vmas[name] = task.mmap(npages * PAGE_SIZE, prot, file=file, pgoff=pgoff, addr=va, name=elf.name)
            va += npages * PAGE_SIZE
            pgoff += npages
    if elf.bss:
        vmas["bss"] = task.mmap(elf.bss * PAGE_SIZE, PROT_READ | PROT_WRITE, addr=va, name=elf.name)
    return LoadedElf(elf, base, vmas)


def execve(kernel: GuestKernel, task: Task, program: Program) -> list[LoadedElf]:
    """do_execve + load_elf_binary + ld.so start-up. Returns the mapped objects, executable first.
    Out of memory after the new mm replaced the old one, the task is left with what was built so far: only
    exiting remains for it."""
    ctx = kernel.enter(task)
    exe_file, ld_file = kernel.file(program.exe), kernel.file(LD_SO)
    kernel.cache.read(exe_file, 0)  # prepare_binprm
    mm = Mm(pgd_alloc(ctx, kernel.kernel_entries))
    mm.randomize(kernel.rng)
    mm.insert(
        Vma(
            mm.stack_top - STACK_INIT_PAGES * PAGE_SIZE,
            mm.stack_top,
            PROT_READ | PROT_WRITE,
            name="[stack]",
            grows_down=True,
        )
    )
    try:
        fault.populate(ctx, mm, mm.stack_top - ARG_PAGES * PAGE_SIZE, mm.stack_top, write=True)  # copy_strings
        kernel.cache.read(ld_file, 0)  # the interpreter's ELF header
    except MemoryError:  # before the point of no return: the new mm goes (free_bprm), the task keeps its own
        kernel.mmput(mm)
        raise
    old, task.mm = task.mm, mm
    task.program, task.comm = program.name, program.name[:15]
    ctx.tlb.switch_mm(ctx.cpu, mm)  # exec_mmap: activate_mm
    if old is not None:
        kernel.mmput(old)
    exe = map_elf(task, ELVES[program.exe], exe_file, mm.load_bias)
    mm.brk_start = mm.brk = exe.base + exe.elf.total_pages * PAGE_SIZE + mm.brk_rnd
    ld_elf = ELVES[LD_SO]
    ld = map_elf(task, ld_elf, ld_file, mm.get_unmapped_area(ld_elf.total_pages * PAGE_SIZE))
    task.mmap(kernel.vdso.nr_pages * PAGE_SIZE, PROT_READ | PROT_EXEC, file=kernel.vdso, name="[vdso]")
    task.objects = [exe, ld]
    # create_elf_tables: argc, the argv and envp pointers and the auxv go onto the new stack with put_user
    task.access_user(mm.stack_top - ARG_PAGES * PAGE_SIZE, mm.stack_top, write=True)
    _run_ld_so(kernel, task, program, task.objects)
    return task.objects


def _run_ld_so(kernel: GuestKernel, task: Task, program: Program, objects: list[LoadedElf]) -> None:
    """_dl_start (ld.so relocates itself), _dl_map_object for each library, relocation of every object,
    RELRO made read-only, then the programs's start-up code runs."""
    exe, ld = objects
    assert task.mm is not None
    task.touch(task.mm.stack_top - ARG_PAGES * PAGE_SIZE, task.mm.stack_top, write=True)  # auxv, argv
    _relocate(task, ld)
    run_code(kernel, task, ld, 0.6)
    for name in program.libs:
        file = kernel.file(name)
        kernel.cache.read(file, 0)  # read() of the ELF header
        elf = ELVES[name]
        objects.append(map_elf(task, elf, file, task.mm.get_unmapped_area(elf.total_pages * PAGE_SIZE)))
    for obj in [exe, *objects[2:]]:
        _relocate(task, obj)
    for obj in objects:
        if "relro" in obj.vmas:
            relro = obj.vmas["relro"]
            task.mprotect(relro.start, relro.end - relro.start, PROT_READ)
    for obj in [exe, *objects[2:]]:
        run_code(kernel, task, obj, program.text_frac)


def _relocate(task: Task, obj: LoadedElf) -> None:
    """Symbol lookup reads the head (dynsym, dynstr, hash); relocations write RELRO, data and bss's first page."""
    task.touch_pages(obj.pages("head"), write=False)
    task.touch_pages(np.concatenate([obj.pages("relro"), obj.pages("data"), obj.pages("bss")[:1]]), write=True)


def run_code(kernel: GuestKernel, task: Task, obj: LoadedElf, frac: float) -> None:
    """Running ``frac`` of an object's code: its hottest text windows and the rodata that code reads."""
    task.touch_pages(kernel.hot_pages(obj, "text", frac), write=False, fetch=True)
    task.touch_pages(kernel.hot_pages(obj, "rodata", frac * RODATA_FRAC), write=False)
