"""Private write faults of a few pages run on Python ints (fault.SCALAR_FAULTS): they must make the very same
hardware calls, allocations and frees as the numpy path."""

from __future__ import annotations

import pytest
from test_guest_batch import mixed_workload
from test_guest_helpers import TEST_VA, MiB, bare_process, hw, same_state, small_kernel

from kvmdbgfs.guest import fault
from kvmdbgfs.guest.allocator import PAGE_ANON, PAGE_CACHE, PageAllocator
from kvmdbgfs.guest.kernel import GuestKernel
from kvmdbgfs.guest.pagecache import File
from kvmdbgfs.guest.vma import PROT_READ, PROT_WRITE

PAGE = 4096


def copy_on_write_mix(kernel: GuestKernel) -> None:
    """Runs of at most 8 pages mixing every case: reuse, copy of a shared anonymous page, of a page-cache
    page, of the zero page, do_cow_fault with a read-around in the middle of the run, fresh anonymous pages."""
    task = bare_process(kernel)
    data = File("data.bin", 256)
    base = TEST_VA + 2 * MiB
    task.mmap(256 * PAGE, PROT_READ | PROT_WRITE, file=data, addr=base)
    task.touch(base, base + PAGE, write=False)  # read-around caches 0..15, fault-around maps them
    task.touch(base + 2 * PAGE, base + 3 * PAGE, write=True)  # page 2 copied: exclusive anonymous
    anon = task.mmap(16 * PAGE, addr=TEST_VA)
    task.touch(anon.start, anon.start + 2 * PAGE, write=False)  # the zero page
    task.touch(anon.start + 2 * PAGE, anon.start + 6 * PAGE, write=True)
    child = kernel.fork(task)
    task.populate(base + PAGE, base + 5 * PAGE, write=True)  # 2 shared with the child now: copied
    child.populate(base + 12 * PAGE, base + 20 * PAGE, write=True)  # 16..19 uncached: do_cow_fault reads around
    child.populate(base + 2 * PAGE, base + 4 * PAGE, write=True)  # 2 exclusive again: reused
    child.populate(anon.start, anon.start + 8 * PAGE, write=True)  # zero page, shared pages, fresh pages
    kernel.exit(child)
    task.populate(anon.start + 4 * PAGE, anon.start + 12 * PAGE, write=True)  # reused after the child's exit


def run_with(monkeypatch: pytest.MonkeyPatch, scenario, scalar_faults: int, batch: bool) -> tuple[GuestKernel, int]:
    """The scenario on a fresh guest with SCALAR_FAULTS set to ``scalar_faults``; how many faults took the
    scalar path."""
    calls = 0
    few = fault._few_private_write_faults

    def counted(*args: object) -> None:
        nonlocal calls
        calls += 1
        few(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(fault, "SCALAR_FAULTS", scalar_faults)
    monkeypatch.setattr(fault, "_few_private_write_faults", counted)
    kernel = small_kernel(batch=batch)
    scenario(kernel)
    return kernel, calls


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("scenario", [copy_on_write_mix, mixed_workload])
def test_few_page_private_write_faults_equal_the_numpy_path(
    monkeypatch: pytest.MonkeyPatch, scenario, batch: bool
) -> None:
    scalar, scalar_calls = run_with(monkeypatch, scenario, fault.SCALAR_FAULTS, batch)
    vectorised, vectorised_calls = run_with(monkeypatch, scenario, 0, batch)
    # Compiled by mypyc (kvmdbgfs/native.py), fault.py calls its own functions directly: the patched counter
    # sees none of them (SCALAR_FAULTS is still read at each fault, so the two runs still take both paths).
    assert (scalar_calls > 0 or not fault.__file__.endswith(".py")) and vectorised_calls == 0
    assert hw(scalar).events == hw(vectorised).events  # the same calls in the same order
    same_state(scalar, vectorised)


def test_single_page_allocator_calls_equal_the_array_ones() -> None:
    one, many = (PageAllocator(100, [(0, 100)], [(50, 90), (0, 50)]) for _ in range(2))
    for kind in (PAGE_ANON, PAGE_CACHE, PAGE_ANON):
        gfn = one.alloc_page(kind)
        assert type(gfn) is int and [gfn] == many.alloc(1, kind).tolist()
    assert one.is_exclusive_anon(gfn) and not one.is_exclusive_anon(gfn - 1)  # the page-cache page
    one.get([gfn])
    many.get([gfn])
    assert not one.is_exclusive_anon(gfn)
    for _ in range(2):
        one.put_page(gfn)
        many.put([gfn])
        assert one.refcount.tolist() == many.refcount.tolist() and one.nr_free == many.nr_free
    assert one.alloc_page(PAGE_ANON) == gfn  # freed at its last reference, handed out first
    with pytest.raises(ValueError):
        one.put_page(gfn + 1)  # never handed out


def test_get_of_a_few_frames_counts_repeats_like_the_array_path() -> None:
    few, many = (PageAllocator(100, [(0, 100)], [(0, 100)]) for _ in range(2))
    frames = few.alloc(3, PAGE_ANON).tolist()
    many.alloc(3, PAGE_ANON)
    repeated = [frames[0], frames[2], frames[0], frames[1], frames[0]]
    few.get(repeated)  # a list, on Python ints
    many.get(repeated * 2)  # past SCALAR_REFS: numpy
    many.put(repeated)
    assert few.refcount.tolist() == many.refcount.tolist()
    assert [few.refcount.item(frame) for frame in frames] == [4, 2, 2]
