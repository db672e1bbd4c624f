"""A bare-metal GuestHardware that records what the guest makes the hardware see.

Every call is logged as elementary events (a store_ptes batch as its stores,
an access of n addresses as n accesses), each with the page-table pages it
walks and the frame it reaches, resolved from guest memory at that moment.
``trace_signature`` reduces a log to what a hypervisor's state can depend on:
for each guest frame, the order of the events that write it (reads between
two writes in any order), and the order of TLB flushes and CR3 loads.
Two logs with the same signature differ only by reordering events that touch
disjoint frames, which no MMU can tell apart.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from kvmdbgfs.guest.hardware import BareMetal
from kvmdbgfs.guest.memory import GuestMemory
from kvmdbgfs.guest.pte import PT_PAGE_SIZE_MASK, PT_PRESENT_MASK, level_span, pt_index, pte_gfn


@dataclass(frozen=True)
class Event:
    """One elementary hardware event. ``path`` holds the tables a walk read, ``gfn`` the frame written
    (the table of a store, the frame an access reached, -1 for none)."""

    op: str  # "store", "access", "invlpg", "flush", "cr3"
    cpu: int
    gfn: int = -1
    index: int = 0
    value: int = 0
    gva: int = 0
    write: bool = False
    user: bool = False
    path: tuple[int, ...] = ()


def translate(memory: GuestMemory, root: int, gva: int) -> tuple[int, tuple[int, ...]]:
    """The frame ``gva`` maps to through the tables at ``root`` (-1 if unmapped), and the tables walked."""
    table, path = root, []
    for level in range(4, 0, -1):
        path.append(table)
        entry = memory.read_pte(table, pt_index(gva, level))
        if not entry & PT_PRESENT_MASK:
            return -1, tuple(path)
        if level == 1 or entry & PT_PAGE_SIZE_MASK:
            return pte_gfn(entry) + (gva % level_span(level)) // 4096, tuple(path)
        table = pte_gfn(entry)
    raise AssertionError("unreachable")


class RecordingHardware(BareMetal):
    """BareMetal plus an event log."""

    def __init__(self, memory: GuestMemory | None = None) -> None:
        super().__init__(memory)
        self.events: list[Event] = []
        self.calls: dict[str, int] = defaultdict(int)  # hardware calls by method, a batch counted once

    def store_pte(self, vcpu_id: int, gfn: int, index: int, value: int) -> None:
        self.calls["store_pte"] += 1
        self.events.append(Event("store", vcpu_id, gfn, index, int(value)))
        super().store_pte(vcpu_id, gfn, index, value)

    def store_ptes(self, vcpu_id: int, gfn: int, indices: np.ndarray, values: np.ndarray) -> None:
        self.calls["store_ptes"] += 1
        for index, value in zip(np.asarray(indices).tolist(), np.asarray(values, np.uint64).tolist()):
            self.events.append(Event("store", vcpu_id, gfn, index, value))
        super().store_ptes(vcpu_id, gfn, indices, values)

    def load_cr3(self, vcpu_id: int, root_gfn: int, noflush: bool = False) -> None:
        self.calls["load_cr3"] += 1
        self.events.append(Event("cr3", vcpu_id, root_gfn, value=int(noflush)))
        super().load_cr3(vcpu_id, root_gfn, noflush)

    def access(self, vcpu_id: int, gvas: np.ndarray, write: bool, user: bool, fetch: bool = False) -> None:
        self.calls["access"] += 1
        for gva in np.asarray(gvas, np.uint64).tolist():
            gfn, path = translate(self.memory, self.cr3[vcpu_id], gva)
            self.events.append(Event("access", vcpu_id, gfn, gva=gva, write=write, user=user, path=path))

    def invlpg(self, vcpu_id: int, gva: int) -> None:
        self.calls["invlpg"] += 1
        self.events.append(Event("invlpg", vcpu_id, gva=gva, path=translate(self.memory, self.cr3[vcpu_id], gva)[1]))

    def flush_tlb(self, vcpu_id: int) -> None:
        self.calls["flush_tlb"] += 1
        self.events.append(Event("flush", vcpu_id))


def trace_signature(events: list[Event]) -> list[tuple[tuple[Event, ...], dict[int, list[object]]]]:
    """Per epoch (the events between two flushes or CR3 loads, and the flush itself): for each frame the
    sequence of events touching it, consecutive reads as a sorted group. Stores write their table, accesses
    write the frame reached and read their walk, INVLPG reads its walk but writes the last table (the one
    a hypervisor resyncs)."""
    epochs: list[tuple[tuple[Event, ...], dict[int, list[object]]]] = []
    per_gfn: dict[int, list[object]] = defaultdict(list)

    def touch(gfn: int, event: Event, read: bool) -> None:
        seq = per_gfn[gfn]
        if read:
            if seq and isinstance(seq[-1], list):
                seq[-1].append(event)
            else:
                seq.append([event])
        else:
            seq.append(event)

    def close(barrier: tuple[Event, ...]) -> None:
        epochs.append(
            (
                barrier,
                {gfn: [sorted(x, key=repr) if isinstance(x, list) else x for x in seq] for gfn, seq in per_gfn.items()},
            )
        )
        per_gfn.clear()

    for event in events:
        if event.op in ("flush", "cr3"):
            close((event,))
            continue
        for depth, table in enumerate(event.path):
            touch(table, event, read=event.op == "access" or depth < len(event.path) - 1)
        if event.gfn >= 0:
            touch(event.gfn, event, read=False)
    close(())
    return epochs
