"""Stat descriptors and stat blocks (include/linux/kvm_host.h STATS_DESC_*, struct kvm_vm_stat/kvm_vcpu_stat)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

HALT_POLL_HIST_COUNT = 32


class StatType(Enum):
    """KVM_STATS_TYPE_*."""

    CUMULATIVE = 0
    INSTANT = 1
    PEAK = 2
    LINEAR_HIST = 3
    LOG_HIST = 4


@dataclass(frozen=True)
class StatDesc:
    """struct _kvm_stats_desc: a stat's name and type; the debugfs mode follows from the type."""

    name: str
    type: StatType = StatType.CUMULATIVE

    @property
    def debugfs_mode(self) -> int:
        """kvm_stats_debugfs_mode(): instant stats are read-only, everything else can be cleared."""
        return 0o444 if self.type is StatType.INSTANT else 0o644


def counters(*names: str) -> tuple[StatDesc, ...]:
    """STATS_DESC_COUNTER for each name."""
    return tuple(StatDesc(name) for name in names)


def icounter(name: str) -> StatDesc:
    """STATS_DESC_ICOUNTER / STATS_DESC_IBOOLEAN: an instant (read-only) stat."""
    return StatDesc(name, StatType.INSTANT)


def pcounter(name: str) -> StatDesc:
    """STATS_DESC_PCOUNTER: a peak stat."""
    return StatDesc(name, StatType.PEAK)


def loghist(name: str) -> StatDesc:
    """STATS_DESC_LOGHIST_TIME_NSEC: a log histogram of HALT_POLL_HIST_COUNT buckets."""
    return StatDesc(name, StatType.LOG_HIST)


class StatBlock:
    """A stat struct: one attribute per stat the model keeps, whatever the profile shows.

    Counters are ints; histograms are numpy arrays. debugfs reads a histogram's
    first bucket only, since it reads one u64 at the descriptor's offset.
    """

    if TYPE_CHECKING:  # the attributes are the descriptors' names, set in __init__ (see kvm/profiles.py)

        def __getattr__(self, name: str) -> Any: ...

        def __setattr__(self, name: str, value: Any) -> None: ...

    def __init__(self, descs: tuple[StatDesc, ...]) -> None:
        for desc in descs:
            value: int | np.ndarray = 0
            if desc.type is StatType.LOG_HIST:
                value = np.zeros(HALT_POLL_HIST_COUNT, dtype=np.uint64)
            setattr(self, desc.name, value)

    def account_pages(self, level: int, delta: int) -> None:
        """kvm_update_page_stats(): present leaf sptes per level (and ``lpages`` of older kernels)."""
        if level == 1:
            self.pages_4k += delta
            return
        if level == 2:
            self.pages_2m += delta
        else:
            self.pages_1g += delta
        self.lpages += delta

    def read_u64(self, name: str) -> int:
        """The u64 at the stat's offset; 0 for a stat this kernel does not have."""
        value = getattr(self, name, 0)
        if isinstance(value, np.ndarray):
            return int(value[0])
        return int(value)

    def clear(self, name: str) -> None:
        """Store 0 at the stat's offset (kvm_clear_stat_per_vm / per_vcpu)."""
        value = getattr(self, name, None)
        if isinstance(value, np.ndarray):
            value[0] = 0
        elif value is not None:
            setattr(self, name, 0)
