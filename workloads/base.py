"""Workloads: named, seeded guest activities with validated parameters.

A workload lives in ``workloads/`` as a subclass of :class:`Workload`. Its
parameters are declared as :class:`Param` and checked, all of them, before
anything runs: a bad one is a ValueError with one clear line and the VM is
left as it was. Randomness comes from the VM's seed and how many workloads
the VM has run before, so a scenario replays byte for byte.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from kvmdbgfs.kvm.host import parse_int, parse_memory

if TYPE_CHECKING:
    from kvmdbgfs.vmm.qemu import QemuProcess

class Progress(Protocol):
    """A workload's safe point: ``(done, total)`` steps so far; ``idle_ns`` of guest time to idle there."""

    def __call__(self, done: int, total: int, idle_ns: int = 0) -> None: ...


def no_progress(done: int, total: int, idle_ns: int = 0) -> None:
    """A progress callback that shows nothing."""


@dataclass(frozen=True)
class Param:
    """One integer parameter: a count, or a size when ``size`` is set ('1M', '64K', bytes)."""

    name: str
    default: int
    minimum: int
    maximum: int
    help: str
    size: bool = False

    def parse(self, value: str | int) -> int:
        """The value as an int within [minimum, maximum]; ValueError with one line otherwise."""
        try:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise TypeError  # a scenario's float or boolean is no integer
            if isinstance(value, int):
                number = value
            else:
                number = parse_memory(value) if self.size else parse_int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name}: not a {'size' if self.size else 'whole number'}: {value!r}") from None
        if not self.minimum <= number <= self.maximum:
            raise ValueError(f"{self.name} must be between {self.minimum} and {self.maximum}, not {number}")
        return number


class Workload(ABC):
    """A scripted guest activity."""

    name: ClassVar[str]
    description: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()

    def settings(self, overrides: Mapping[str, Any]) -> dict[str, int]:
        """Defaults with ``overrides`` applied, every one validated."""
        known = {param.name: param for param in self.params}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            names = ", ".join(known) or "none"
            raise ValueError(f"{self.name}: unknown parameter {unknown[0]!r} (parameters: {names})")
        return {name: param.parse(overrides.get(name, param.default)) for name, param in known.items()}

    def check_vm(self, vm: QemuProcess) -> None:
        """Refuse a VM this workload cannot run on (ValueError); the default accepts any."""

    @abstractmethod
    def run(self, vm: QemuProcess, settings: dict[str, int], rng: np.random.Generator, progress: Progress) -> dict[str, Any]:
        """Drive the guest; return a short summary (JSON-able)."""


def parse_assignments(assignments: list[str], option: str = "--set") -> dict[str, str]:
    """``["key=value", ...]`` from the command line (``option``'s values) into a dict; ValueError for a malformed
    one."""
    settings: dict[str, str] = {}
    for item in assignments:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ValueError(f"{option} takes key=value, not {item!r}")
        settings[key] = value
    return settings
