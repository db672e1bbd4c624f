"""Kernel profile files: a profile as JSON, written by `kvmdbgfs profile --from-host`, read by `--kernel FILE`.

The file says what decides the tree (the stat descriptors in table order, whether ``mmu_rmaps_stat``, the vCPU
``pid`` file and the TSC-scaling files exist) and which built-in profile's rules (rmap design, halt polling,
exit accounting, MMU rules) the kernel runs::

    {
      "kvmdbgfs_profile": 1,
      "name": "host-6.18.44",
      "release": "6.18.44-fc",
      "rules": "latest",
      "vm_stats": [{"name": "remote_tlb_flush", "type": "cumulative"}, ...],
      "vcpu_stats": [{"name": "halt_successful_poll", "type": "cumulative"}, ...],
      "mmu_rmaps_stat": true,
      "vcpu_pid": true,
      "tsc_scaling": false
    }

A stat's type is one of KVM_STATS_TYPE_*: cumulative, instant, peak, linear_hist, log_hist; it decides the
file's mode (kvm_stats_debugfs_mode: instant 0444, the rest 0644). A stat the model does not keep reads 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kvmdbgfs.kvm.profiles import PROFILES, KernelProfile
from kvmdbgfs.kvm.stats import StatDesc, StatType
from kvmdbgfs.regular_file import read_regular_file

FORMAT_VERSION = 1
MAX_PROFILE_BYTES = 1 << 20
KVM_STATS_NAME_SIZE = 48  # the name field, NUL included
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$", re.ASCII)
_KEYS = {"kvmdbgfs_profile", "name", "release", "rules", "vm_stats", "vcpu_stats", "mmu_rmaps_stat", "vcpu_pid",
         "tsc_scaling"}
_STAT_KEYS = {"name", "type"}


class ProfileError(ValueError):
    """A profile that cannot be read or written: one line that says why."""


@dataclass(frozen=True)
class ProfileFile:
    """The content of a profile file."""

    name: str
    release: str
    rules: str
    vm_stats: tuple[StatDesc, ...]
    vcpu_stats: tuple[StatDesc, ...]
    mmu_rmaps_stat: bool
    vcpu_pid: bool
    tsc_scaling: bool

    def kernel_profile(self) -> KernelProfile:
        """The built-in ``rules`` profile with this file's tree."""
        return replace(
            PROFILES[self.rules],
            name=self.name,
            vm_stats=self.vm_stats,
            vcpu_stats=self.vcpu_stats,
            has_mmu_rmaps_stat=self.mmu_rmaps_stat,
            has_vcpu_pid=self.vcpu_pid,
            has_tsc_scaling=self.tsc_scaling,
        )


def dumps(profile: ProfileFile) -> str:
    """The file's text."""
    fields = {
        "kvmdbgfs_profile": json.dumps(FORMAT_VERSION),
        "name": json.dumps(profile.name),
        "release": json.dumps(profile.release),
        "rules": json.dumps(profile.rules),
        "vm_stats": _stat_list(profile.vm_stats),
        "vcpu_stats": _stat_list(profile.vcpu_stats),
        "mmu_rmaps_stat": json.dumps(profile.mmu_rmaps_stat),
        "vcpu_pid": json.dumps(profile.vcpu_pid),
        "tsc_scaling": json.dumps(profile.tsc_scaling),
    }
    return "{\n" + ",\n".join(f"  {json.dumps(key)}: {value}" for key, value in fields.items()) + "\n}\n"


def _stat_list(descs: tuple[StatDesc, ...]) -> str:
    """One stat a line, in table order."""
    lines = (json.dumps({"name": desc.name, "type": desc.type.name.lower()}) for desc in descs)
    return "[\n" + ",\n".join(f"    {line}" for line in lines) + "\n  ]"


def loads(text: str) -> ProfileFile:
    """Parse and check a profile file's text; ProfileError naming the first problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError("a JSON object expected")
    unknown, missing = set(data) - _KEYS, _KEYS - set(data)
    if unknown:
        raise ProfileError(f"unknown keys {sorted(unknown)}")
    if missing:
        raise ProfileError(f"missing keys {sorted(missing)}")
    if data["kvmdbgfs_profile"] != FORMAT_VERSION:
        raise ProfileError(f"kvmdbgfs_profile must be {FORMAT_VERSION}")
    name, release, rules = (_string(data, key) for key in ("name", "release", "rules"))
    if not _NAME.match(name) or name in PROFILES or "+" in name:
        raise ProfileError(f"name {name!r}: letters, digits, '_', '.', '-', and not a built-in profile's")
    if rules not in PROFILES:
        raise ProfileError(f"rules {rules!r}: not a built-in profile (known: {', '.join(PROFILES)})")
    vm_stats, vcpu_stats = _stats(data, "vm_stats"), _stats(data, "vcpu_stats")
    names = [desc.name for desc in vm_stats + vcpu_stats]
    duplicates = sorted({stat for stat in names if names.count(stat) > 1})
    if duplicates:
        raise ProfileError(f"stats named twice: {duplicates}")
    flags = [_bool(data, key) for key in ("mmu_rmaps_stat", "vcpu_pid", "tsc_scaling")]
    return ProfileFile(name, release, rules, vm_stats, vcpu_stats, *flags)


def _string(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise ProfileError(f"{key} must be a non-empty string")
    return value


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data[key]
    if not isinstance(value, bool):
        raise ProfileError(f"{key} must be true or false")
    return value


def _stats(data: dict[str, Any], key: str) -> tuple[StatDesc, ...]:
    entries = data[key]
    if not isinstance(entries, list):
        raise ProfileError(f"{key} must be a list")
    return tuple(_stat(entry, f"{key}[{index}]") for index, entry in enumerate(entries))


def _stat(entry: Any, where: str) -> StatDesc:
    if not isinstance(entry, dict) or set(entry) != _STAT_KEYS:
        raise ProfileError(f"{where} must be {{\"name\": ..., \"type\": ...}}")
    name, kind = entry["name"], entry["type"]
    if not (isinstance(name, str) and 0 < len(name) < KVM_STATS_NAME_SIZE and _NAME.match(name)):
        raise ProfileError(f"{where}: bad stat name {name!r}")
    if not isinstance(kind, str) or kind.upper() not in StatType.__members__:
        known = ", ".join(t.name.lower() for t in StatType)
        raise ProfileError(f"{where}: type {kind!r} is not one of {known}")
    return StatDesc(name, StatType[kind.upper()])


def load_profile_file(path: str) -> KernelProfile:
    """`--kernel FILE`: the profile a file describes; ValueError with one line naming the file."""
    try:
        return loads(read_regular_file(path, MAX_PROFILE_BYTES).decode()).kernel_profile()
    except OSError as exc:
        raise ProfileError(f"kernel profile {path}: {exc.strerror or exc}") from None
    except (ProfileError, UnicodeDecodeError) as exc:
        raise ProfileError(f"kernel profile {path}: {exc}") from None


def save_profile_file(profile: ProfileFile, path: Path) -> None:
    """Write the file (replacing one that is there)."""
    try:
        path.write_text(dumps(profile))
    except OSError as exc:
        raise ProfileError(f"{path}: {exc.strerror or exc}") from None
