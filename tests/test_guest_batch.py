"""Batch paths against one-by-one processing, determinism, an idle boot, and the speed of the batch paths."""

from __future__ import annotations


from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from test_guest_helpers import TEST_VA, MiB, bare_process, hw, same_state, small_kernel

from kvmdbgfs.guest import userspace
from kvmdbgfs.guest.kernel import GuestKernel
from kvmdbgfs.guest.pagecache import File
from kvmdbgfs.guest.process import Task
from kvmdbgfs.guest.vma import PROT_READ, PROT_WRITE

PAGE = 4096
GiB = 1 << 30
SMALL_BOOT = {"services": [("cron", 1), ("dbus-daemon", 1)], "helpers": [("sh", 1)], "session": ["sshd", "bash"]}


def mixed_workload(kernel: GuestKernel) -> None:
    system = userspace.boot(kernel, **SMALL_BOOT)  # type: ignore[arg-type]
    shell = system.session[-1]
    anon = shell.mmap(3 * MiB, name="anon")
    shell.populate(anon.start, anon.end, write=True)
    huge = shell.mmap(6 * MiB, name="huge")
    shell.madvise_hugepage(huge.start, huge.end - huge.start)
    shell.touch(huge.start, huge.end, write=True, step=64)
    shm = shell.mmap(MiB, shared=True)
    shell.touch(shm.start, shm.end, write=True)
    child = kernel.fork(shell)
    child.touch(anon.start, anon.start + MiB, write=True)
    child.touch(shm.start, shm.end, write=False)
    child.touch(huge.start, huge.end, write=True, step=200)
    shell.munmap(anon.start + MiB, MiB)
    kernel.exit(child)
    shell.populate(anon.start, anon.start + MiB, write=True)
    kernel.exec(shell, "sh")
    system.advance(30)


def test_batch_and_one_by_one_give_the_same_guest() -> None:
    batched, single = small_kernel(batch=True), small_kernel(batch=False)
    mixed_workload(batched)
    mixed_workload(single)
    same_state(batched, single)
    assert hw(batched).events != hw(single).events  # the same history, not the same order
    assert hw(batched).calls["store_ptes"] > 0 and hw(single).calls["store_ptes"] == 0
    assert sum(hw(batched).calls.values()) < sum(hw(single).calls.values()) / 2


OPS = st.lists(
    st.tuples(
        st.sampled_from(["anon", "shared", "file", "touch", "populate", "fork", "exit", "munmap", "mprotect", "huge"]),
        st.integers(0, 7),
        st.integers(0, 600),
        st.one_of(st.integers(1, 64), st.sampled_from([300, 511, 512, 700, 1024, 1100])),
        st.booleans(),
    ),
    min_size=3,
    max_size=14,
)


def run_ops(kernel: GuestKernel, ops: list[tuple[str, int, int, int, bool]]) -> None:
    tasks: list[Task] = [bare_process(kernel)]
    data = File("data.bin", 2048)
    for name, pick, offset, npages, flag in ops:
        task = tasks[pick % len(tasks)]
        assert task.mm is not None
        mine = [v for v in task.mm.vmas if v.name == "t"]
        vma = mine[pick % len(mine)] if mine else None
        if name in ("anon", "shared", "file"):
            hugepage = offset % 3 == 0
            npages = max(npages, 600) if hugepage else npages
            addr = TEST_VA + (len(mine) + pick) * 4 * MiB
            if task.mm.find_vma(addr) is None or task.mm.find_vma(addr).start >= addr + npages * PAGE:
                new = task.mmap(
                    npages * PAGE,
                    shared=name == "shared",
                    file=data if name == "file" else None,
                    pgoff=offset % 300,
                    addr=addr,
                    name="t",
                )
                if hugepage:
                    task.madvise_hugepage(new.start, new.end - new.start)
                if flag:
                    task.populate(new.start, new.end, name != "shared")
        elif name == "fork":
            tasks.append(kernel.fork(task))
        elif name == "exit" and len(tasks) > 1:
            kernel.exit(tasks.pop(pick % (len(tasks) - 1) + 1))
        elif vma is not None:
            start = vma.start + offset % vma.npages * PAGE
            end = min(vma.end, start + npages * PAGE)
            write = flag and bool(vma.prot & PROT_WRITE)
            if name == "touch":
                task.touch(start, end, write)
            elif name == "populate":
                task.populate(start, end, write)
            elif name == "huge":  # the whole VMA, so that THPs can fit
                task.madvise_hugepage(vma.start, vma.end - vma.start)
            elif name == "munmap":
                task.munmap(start, end - start)
            else:
                task.mprotect(start, end - start, PROT_READ | (PROT_WRITE if flag else 0))


@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no slow shrink
@given(OPS)
def test_random_operations_batch_equals_one_by_one(ops: list[tuple[str, int, int, int, bool]]) -> None:
    batched, single = small_kernel(memory=128 * MiB, batch=True), small_kernel(memory=128 * MiB, batch=False)
    run_ops(batched, ops)
    run_ops(single, ops)
    same_state(batched, single)


def test_same_seed_same_guest_other_seed_other_guest() -> None:
    first, second, other = small_kernel(seed=5), small_kernel(seed=5), small_kernel(seed=6)
    for kernel in (first, second, other):
        mixed_workload(kernel)
    assert hw(first).events == hw(second).events
    assert hw(first).memory._tables.keys() == hw(second).memory._tables.keys()
    assert hw(first).events != hw(other).events


def test_idle_boot_shares_libraries_across_processes() -> None:
    kernel = small_kernel(memory=1 * GiB)
    system = kernel.boot()
    stats = kernel.stats()
    assert 130 <= stats["processes"] + stats["kernel_threads"] <= 170
    assert stats["processes"] >= 25
    libc = kernel.files["libc.so.6"]
    counts = kernel.ctx.pages.refcount[libc.pages[libc.pages >= 0]] - 1  # minus the page cache's reference
    assert counts.max() >= 0.8 * stats["processes"]  # the hottest libc pages are mapped by (almost) everyone
    assert system.advance(60) > 100
