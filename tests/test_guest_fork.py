"""fork: copy_page_range copies and write-protects private anonymous PTEs and skips what can refault."""

from __future__ import annotations

from test_guest_helpers import TEST_VA, MiB, bare_process, hw, pte_table, small_kernel, user_pte

from kvmdbgfs.guest.pagecache import File
from kvmdbgfs.guest.pte import PT_ACCESSED_MASK, PT_DIRTY_MASK, PT_WRITABLE_MASK, pte_gfn
from kvmdbgfs.guest.vma import PROT_EXEC, PROT_READ, PROT_WRITE

PAGE = 4096


def test_fork_copies_private_anonymous_ptes_and_write_protects_both_sides() -> None:
    kernel = small_kernel()
    parent = bare_process(kernel)
    anon = parent.mmap(2 * MiB, addr=TEST_VA)
    parent.touch(anon.start, anon.start + 40 * PAGE, write=True)
    shared = parent.mmap(16 * PAGE, shared=True, addr=TEST_VA + 4 * MiB)
    parent.touch(shared.start, shared.end, write=True)
    text = File("tool", 16)
    parent.mmap(16 * PAGE, PROT_READ | PROT_EXEC, file=text, addr=TEST_VA + 8 * MiB)
    parent.touch(TEST_VA + 8 * MiB, TEST_VA + 8 * MiB + PAGE, write=False)
    before = [user_pte(kernel, parent, anon.start + i * PAGE) for i in range(40)]
    start = len(hw(kernel).events)
    child = kernel.fork(parent)
    events = hw(kernel).events[start:]
    for i, old in enumerate(before):
        va = anon.start + i * PAGE
        assert user_pte(kernel, parent, va) == old & ~PT_WRITABLE_MASK
        assert user_pte(kernel, child, va) == old & ~(PT_WRITABLE_MASK | PT_ACCESSED_MASK)
        assert old & PT_DIRTY_MASK and kernel.ctx.pages.refcount[pte_gfn(old)] == 2
    assert not any(user_pte(kernel, child, shared.start + i * PAGE) for i in range(16))  # shmem: refaults
    assert not user_pte(kernel, child, TEST_VA + 8 * MiB)  # text without anonymous pages: refaults
    assert shared.file is not None and shared.file.mappings == 2
    parent_stores = [e for e in events if e.op == "store" and e.gfn == pte_table(kernel, parent, anon.start)]
    assert [e.index for e in parent_stores] == list(range(40))
    assert events[-1].op == "flush" and events[-1].cpu == parent.cpu  # flush_tlb_mm(oldmm)
    assert events.index(events[-1]) > max(events.index(e) for e in parent_stores)


def test_cow_after_fork_copies_in_the_child_and_reuses_in_the_parent() -> None:
    kernel = small_kernel()
    parent = bare_process(kernel)
    parent.mmap(MiB, addr=TEST_VA)
    parent.touch(TEST_VA, TEST_VA + 4 * PAGE, write=True)
    original = pte_gfn(user_pte(kernel, parent, TEST_VA))
    child = kernel.fork(parent)
    child.touch(TEST_VA, TEST_VA + PAGE, write=True)
    copy = pte_gfn(user_pte(kernel, child, TEST_VA))
    assert copy != original and kernel.ctx.pages.refcount[original] == 1
    start = len(hw(kernel).events)
    parent.touch(TEST_VA, TEST_VA + PAGE, write=True)  # the only user left: wp_page_reuse
    ops = [e.op for e in hw(kernel).events[start:]]
    assert "invlpg" not in ops and ops.count("store") == 1
    assert pte_gfn(user_pte(kernel, parent, TEST_VA)) == original
    assert user_pte(kernel, parent, TEST_VA) & PT_WRITABLE_MASK


def test_private_file_mapping_is_copied_once_it_has_cow_pages() -> None:
    kernel = small_kernel()
    parent = bare_process(kernel)
    data = File("data", 8)
    parent.mmap(8 * PAGE, PROT_READ | PROT_WRITE, file=data, addr=TEST_VA)
    parent.touch(TEST_VA, TEST_VA + 8 * PAGE, write=False)
    assert not any(user_pte(kernel, kernel.fork(parent), TEST_VA + i * PAGE) for i in range(8))
    parent.touch(TEST_VA, TEST_VA + PAGE, write=True)
    child = kernel.fork(parent)
    ptes = [user_pte(kernel, child, TEST_VA + i * PAGE) for i in range(8)]
    assert all(ptes) and not any(p & PT_WRITABLE_MASK for p in ptes)
    assert [pte_gfn(p) for p in ptes[1:]] == data.pages[1:].tolist()  # the file pages are copied as they are
    assert kernel.ctx.pages.refcount[data.pages[1]] == 3  # cache, parent, the second child
