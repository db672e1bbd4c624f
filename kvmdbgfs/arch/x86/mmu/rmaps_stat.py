"""The per-VM ``mmu_rmaps_stat`` file (arch/x86/kvm/debugfs.c): a histogram of rmap list lengths, bucketed
with ffs() as the kernel does (or with fls(), the log2 buckets the header promises)."""

from __future__ import annotations

from typing import Final

from collections.abc import Callable, Iterable

import numpy as np

from kvmdbgfs.arch.x86.mmu.memslot import KVM_NR_PAGE_SIZES, KvmMemorySlot
from kvmdbgfs.arch.x86.mmu.pte_list import PteListDesign, scan_heads

RMAP_LOG_SIZE: Final = 11
LEVEL_NAMES: Final = ("4K", "2M", "1G")


def rmap_bucket_fls(counts: np.ndarray) -> np.ndarray:
    """fls(count) clamped to RMAP_LOG_SIZE - 1: the log2 bucket the header promises (counts < 2**53)."""
    _, exponent = np.frexp(np.asarray(counts, np.float64))
    return np.minimum(exponent, RMAP_LOG_SIZE - 1).astype(np.int64)


def rmap_bucket_ffs(counts: np.ndarray) -> np.ndarray:
    """ffs(count) clamped to RMAP_LOG_SIZE - 1: what the kernel actually computes."""
    counts = np.asarray(counts, np.int64)
    return rmap_bucket_fls(counts & -counts)


BUCKETS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"fls": rmap_bucket_fls, "ffs": rmap_bucket_ffs}


def rmaps_histogram(
    slots: Iterable[KvmMemorySlot], pte_list: PteListDesign, bucket: str = "ffs"
) -> np.ndarray:
    """kvm_mmu_rmaps_stat_show's walk: shape (3, 11), every head of every slot that has rmaps.

    Zero and single heads are counted straight from the head arrays (a single spte has
    count 1: bucket 1 under fls and ffs); the lists of each level are counted in one call.
    """
    hist = np.zeros((KVM_NR_PAGE_SIZES, RMAP_LOG_SIZE), np.int64)
    lists: list[list[np.ndarray]] = [[np.zeros(0, np.int64)] for _ in range(KVM_NR_PAGE_SIZES)]
    for slot in slots:
        for level, heads in enumerate(slot.rmap or ()):
            nonempty, positions = scan_heads(heads)
            many = heads[positions]
            lists[level].append(many)
            hist[level, 0] += len(heads) - nonempty
            hist[level, 1] += nonempty - len(many)
    for level, values in enumerate(lists):
        hist[level] += np.bincount(
            BUCKETS[bucket](pte_list.count_lists(np.concatenate(values))), minlength=RMAP_LOG_SIZE
        )
    return hist


def format_mmu_rmaps_stat(hist: np.ndarray) -> str:
    """The file's text: a header and one line per level, every field followed by a TAB."""
    ranges = "".join(f"{1 << (i - 1)}-{(1 << i) - 1}\t" for i in range(2, RMAP_LOG_SIZE))
    lines = [f"Rmap_Count:\t0\t1\t{ranges}\n"]
    lines += [
        f"Level={name}:\t" + "".join(f"{int(v)}\t" for v in row) + "\n"
        for name, row in zip(LEVEL_NAMES, hist)
    ]
    return "".join(lines)


def mmu_rmaps_stat_show(slots: Iterable[KvmMemorySlot], pte_list: PteListDesign, bucket: str = "ffs") -> str:
    """kvm_mmu_rmaps_stat_show: empty when the VM has no rmaps (kvm_memslots_have_rmaps)."""
    slots = list(slots)
    if all(slot.rmap is None for slot in slots):
        return ""
    return format_mmu_rmaps_stat(rmaps_histogram(slots, pte_list, bucket))
