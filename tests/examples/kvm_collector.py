"""A collector written the way exporters are: walk a KVM debugfs tree, parse every stat.

    python tests/examples/kvm_collector.py [/sys/kernel/debug/kvm]

prints one Prometheus-style sample per stat: ``kvm_exits 1234`` for the host's sums, ``kvm_exits{vm="4242-12"}
1200`` for a VM's. The field list is the top-level files, as kvm_stat builds it. VMs come and go while it
walks: a VM destroyed meanwhile loses its samples (ENOENT), nothing else; files that are not a number
(``mmu_rmaps_stat``) are skipped.
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass, field

DEFAULT_ROOT = "/sys/kernel/debug/kvm"


@dataclass
class Collection:
    """One walk: the field list (top-level files) and the samples, keyed (vm, stat); vm "" for the sums."""

    fields: list[str] = field(default_factory=list)
    samples: dict[tuple[str, str], int] = field(default_factory=dict)


def read_stat(path: str) -> int | None:
    """The number in ``path``; None if it is not one, or if its VM went away (ENOENT)."""
    try:
        with open(path, "rb") as file:
            text = file.read()
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    try:
        return int(text)
    except ValueError:
        return None


def collect(root: str) -> Collection:
    """Walk ``root`` and its VM directories (not the vcpu directories below them)."""
    collection = Collection()
    for dirpath, dirnames, filenames in os.walk(root):
        vm = os.path.relpath(dirpath, root)
        if vm == ".":
            vm = ""
            collection.fields = sorted(filenames)
        else:
            dirnames.clear()
        for name in filenames:
            value = read_stat(os.path.join(dirpath, name))
            if value is not None:
                collection.samples[vm, name] = value
    return collection


def main(argv: list[str]) -> int:
    root = argv[1] if len(argv) > 1 else DEFAULT_ROOT
    for (vm, stat), value in sorted(collect(root).samples.items()):
        labels = f'{{vm="{vm}"}}' if vm else ""
        print(f"kvm_{stat}{labels} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
