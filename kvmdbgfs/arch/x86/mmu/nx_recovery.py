"""The NX huge page recovery thread (kvm-nx-lpage-recovery): zaps accounted NX huge pages, a share each period.

With the default parameters (nx_huge_pages_recovery_ratio=60, nx_huge_pages_recovery_period_ms=0) it wakes
every 60 s and zaps ceil(nx_lpage_splits / 60) of the accounted pages, oldest first: about 1/60 of them, so
that every split is recovered within an hour unless the guest executes from it again.
"""

from __future__ import annotations

from typing import Final, TYPE_CHECKING

from mypy_extensions import mypyc_attr

from kvmdbgfs.arch.x86.mmu.zap import kvm_mmu_prepare_zap_page, kvm_mmu_remote_flush_or_zap

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu
    from kvmdbgfs.arch.x86.mmu.shadow_page import KvmMmuPage

NX_HUGE_PAGES_RECOVERY_RATIO: Final = 60  # the module default (0 under CONFIG_PREEMPT_RT)
NX_HUGE_PAGES_RECOVERY_PERIOD_MS: Final = 0  # the module default: derived from the ratio
NSEC_PER_MSEC: Final = 1_000_000


def nx_huge_pages_recovery_period_ns(
    ratio: int = NX_HUGE_PAGES_RECOVERY_RATIO, period_ms: int = NX_HUGE_PAGES_RECOVERY_PERIOD_MS
) -> int | None:
    """calc_nx_huge_pages_recovery_period(): None when recovery is off (ratio 0); a period of 0 means an hour
    divided by the ratio (at least a second)."""
    if not ratio:
        return None
    if not period_ms:
        period_ms = 60 * 60 * 1000 // min(ratio, 3600)
    return period_ms * NSEC_PER_MSEC


def kvm_recover_nx_huge_pages(mmu: KvmMmu, ratio: int = NX_HUGE_PAGES_RECOVERY_RATIO) -> int:
    """kvm_recover_nx_huge_pages(): zap the oldest ceil(nx_lpage_splits / ratio) accounted pages; returns how
    many were zapped."""
    with mmu.locked:
        mmu._host()
        to_zap = -(-mmu.stat.nx_lpage_splits // ratio) if ratio else 0
        invalid_list: list[KvmMmuPage] = []
        flush = False
        zapped = 0
        for _ in range(to_zap):
            oldest = mmu.possible_nx_huge_pages.oldest()
            if oldest is None:
                break
            sp_id, page = oldest
            if mmu.tdp is not None:
                flush |= mmu.tdp.zap_sp(sp_id)
            else:
                kvm_mmu_prepare_zap_page(mmu, page, invalid_list)  # type: ignore[arg-type]
            zapped += 1
        kvm_mmu_remote_flush_or_zap(mmu, invalid_list, flush)
        return zapped


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class NxRecoveryWorker:
    """kvm_nx_huge_page_recovery_worker(): the VM's recovery thread, on the VM's clock (ns since it was
    created): it wakes every period and runs kvm_recover_nx_huge_pages()."""

    def __init__(self, mmu: KvmMmu, start_ns: int = 0) -> None:
        self.mmu = mmu
        self.period_ns = nx_huge_pages_recovery_period_ns()
        self.next_ns = None if self.period_ns is None else start_ns + self.period_ns

    def run_until(self, now_ns: int) -> None:
        """Every wake-up due by ``now_ns``, in order."""
        while self.next_ns is not None and self.period_ns is not None and self.next_ns <= now_ns:
            kvm_recover_nx_huge_pages(self.mmu)
            self.next_ns += self.period_ns
