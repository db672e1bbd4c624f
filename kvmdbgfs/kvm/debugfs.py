"""The generic KVM debugfs tree (virt/kvm/kvm_main.c): top-level sums, per-VM and per-vCPU directories."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmdbgfs.debugfs.dentry import Dentry, create_dir, create_file, remove_recursive
from kvmdbgfs.debugfs.errors import EINVAL, ENOENT, kernel_error
from kvmdbgfs.debugfs.file import File, FileOperations
from kvmdbgfs.debugfs.simple_attr import simple_attribute_fops
from kvmdbgfs.kvm.profiles import KernelProfile
from kvmdbgfs.kvm.stats import StatDesc

if TYPE_CHECKING:
    from kvmdbgfs.kvm.host import KvmHost
    from kvmdbgfs.kvm.vcpu import KvmVcpu
    from kvmdbgfs.kvm.vm import Kvm

log = logging.getLogger(__name__)

STAT_FORMAT = "%llu\n"
KIND_VM, KIND_VCPU = "vm", "vcpu"


class VmPinnedFops(FileOperations):
    """kvm_debugfs_open/release around any file operations: an open pins the VM.

    The open takes a reference with kvm_get_kvm_safe() and fails with ENOENT
    once the count has reached zero; the release drops it with kvm_put_kvm().
    A failed inner open drops the reference again.
    """

    def __init__(self, inner: FileOperations, kvm_of: Callable[[Any], Kvm]) -> None:
        self.inner = inner
        self.kvm_of = kvm_of

    def open(self, file: File) -> None:
        kvm = self.kvm_of(file.data)
        if not kvm.get_kvm_safe():
            raise kernel_error(ENOENT)
        try:
            self.inner.open(file)
        except BaseException:
            kvm.put_kvm()
            raise

    def read(self, file: File, size: int, offset: int) -> bytes:
        return self.inner.read(file, size, offset)

    def write(self, file: File, data: bytes, offset: int) -> int:
        return self.inner.write(file, data, offset)

    def release(self, file: File) -> None:
        try:
            self.inner.release(file)
        finally:
            self.kvm_of(file.data).put_kvm()


def _require_zero(value: int) -> None:
    """The stat clear callbacks accept only 0."""
    if value:
        raise kernel_error(EINVAL)


@dataclass(frozen=True)
class KvmStatData:
    """struct kvm_stat_data: the VM and descriptor behind a per-VM stat file."""

    kvm: Kvm
    desc: StatDesc
    kind: str


def kvm_stat_data_get(data: KvmStatData) -> int:
    """kvm_stat_data_get(): this VM's stat, or the sum over its vCPUs."""
    if data.kind == KIND_VM:
        return data.kvm.stat.read_u64(data.desc.name)
    return data.kvm.vcpu_stat_sum(data.desc.name)


def kvm_stat_data_clear(data: KvmStatData, value: int) -> None:
    """kvm_stat_data_clear(): 0 clears the stat in this VM or in all its vCPUs, a plain store under no lock
    (kvm_clear_stat_per_vm / kvm_clear_stat_per_vcpu)."""
    _require_zero(value)
    for stat in _stat_blocks(data.kvm, data.kind):
        stat.clear(data.desc.name)


def _stat_blocks(kvm: Kvm, kind: str) -> list:
    return [kvm.stat] if kind == KIND_VM else [vcpu.stat for vcpu in kvm.vcpus]


def _vm_shows(kvm: Kvm, desc: StatDesc, kind: str) -> bool:
    stats = kvm.profile.vm_stats if kind == KIND_VM else kvm.profile.vcpu_stats
    return desc in stats


def _per_vm_stat_fops(writable: bool) -> FileOperations:
    set_ = kvm_stat_data_clear if writable else None
    return VmPinnedFops(simple_attribute_fops(kvm_stat_data_get, set_, STAT_FORMAT), lambda data: data.kvm)


STAT_FOPS_PER_VM = _per_vm_stat_fops(True)
STAT_READONLY_FOPS_PER_VM = _per_vm_stat_fops(False)


@dataclass(frozen=True)
class TopLevelStat:
    """What a top-level stat file reads: one descriptor, summed over every VM on vm_list."""

    host: KvmHost
    desc: StatDesc
    kind: str


def top_level_stat_get(data: TopLevelStat) -> int:
    """vm_stat_get()/vcpu_stat_get(): a plain sum over all VMs, peak stats included."""
    with data.host.kvm_lock:
        vms = list(data.host.vm_list)
    return sum(
        kvm_stat_data_get(KvmStatData(kvm, data.desc, data.kind))
        for kvm in vms
        if _vm_shows(kvm, data.desc, data.kind)
    )


def top_level_stat_clear(data: TopLevelStat, value: int) -> None:
    """vm_stat_clear()/vcpu_stat_clear(): 0 clears the stat in every VM (every vCPU)."""
    _require_zero(value)
    with data.host.kvm_lock:
        for kvm in data.host.vm_list:
            if _vm_shows(kvm, data.desc, data.kind):
                kvm_stat_data_clear(KvmStatData(kvm, data.desc, data.kind), 0)


TOP_LEVEL_STAT_FOPS = simple_attribute_fops(top_level_stat_get, top_level_stat_clear, STAT_FORMAT)
TOP_LEVEL_STAT_READONLY_FOPS = simple_attribute_fops(top_level_stat_get, None, STAT_FORMAT)


def _descs_with_kind(profile: KernelProfile) -> list[tuple[StatDesc, str]]:
    return [(d, KIND_VM) for d in profile.vm_stats] + [
        (d, KIND_VCPU) for d in profile.vcpu_stats
    ]


def _create_stat_files(
    parent: Dentry,
    profile: KernelProfile,
    data_of: Callable[[StatDesc, str], object],
    fops: FileOperations,
    readonly_fops: FileOperations,
) -> None:
    """One file per VM and per vCPU descriptor, in table order, with the mode the stat type gives."""
    for desc, kind in _descs_with_kind(profile):
        writable = bool(desc.debugfs_mode & 0o222)
        create_file(desc.name, desc.debugfs_mode, parent, data_of(desc, kind), fops if writable else readonly_fops)


def kvm_init_debug(host: KvmHost) -> None:
    """kvm_init_debug(): one top-level file per VM and per vCPU descriptor."""
    _create_stat_files(
        host.debugfs_dir,
        host.profile,
        lambda desc, kind: TopLevelStat(host, desc, kind),
        TOP_LEVEL_STAT_FOPS,
        TOP_LEVEL_STAT_READONLY_FOPS,
    )


def kvm_create_vm_debugfs(kvm: Kvm) -> None:
    """kvm_create_vm_debugfs(): the ``<pid>-<fd>`` directory, its stat files, then the arch files."""
    parent = kvm.host.debugfs_dir
    if kvm.name in parent.children:
        log.warning("KVM: debugfs: duplicate directory %s", kvm.name)
        return
    kvm.debugfs_dentry = create_dir(kvm.name, parent)
    _create_stat_files(
        kvm.debugfs_dentry,
        kvm.profile,
        lambda desc, kind: KvmStatData(kvm, desc, kind),
        STAT_FOPS_PER_VM,
        STAT_READONLY_FOPS_PER_VM,
    )
    kvm.arch.kvm_arch_create_vm_debugfs(kvm)


def kvm_destroy_vm_debugfs(kvm: Kvm) -> None:
    """kvm_destroy_vm_debugfs(): remove the VM's directory recursively."""
    if kvm.debugfs_dentry is not None:
        remove_recursive(kvm.debugfs_dentry)


def vcpu_get_pid(vcpu: KvmVcpu) -> int:
    """vcpu_get_pid(): the vCPU thread's pid, 0 before its first KVM_RUN."""
    return vcpu.pid


def kvm_create_vcpu_debugfs(vcpu: KvmVcpu) -> None:
    """kvm_create_vcpu_debugfs(): ``vcpu<id>`` with ``pid`` (when the kernel has it) and the arch files."""
    kvm = vcpu.kvm
    if kvm.debugfs_dentry is None:
        return
    dentry = create_dir(f"vcpu{vcpu.vcpu_id}", kvm.debugfs_dentry)
    if kvm.profile.has_vcpu_pid:
        create_vcpu_file("pid", vcpu, dentry, vcpu_get_pid, "%llu\n")
    kvm.arch.kvm_arch_create_vcpu_debugfs(vcpu, dentry)


def create_vcpu_file(name: str, vcpu: KvmVcpu, parent: Dentry, get: Callable[[Any], int], fmt: str) -> None:
    """A read-only (0444) vCPU attribute file, as kvm_create_vcpu_debugfs() and kvm_arch_create_vcpu_debugfs()
    make them (DEFINE_SIMPLE_ATTRIBUTE): its open takes no VM reference, so the file goes with the VM's
    directory and a read on it after that fails with EIO (debugfs_file_get)."""
    create_file(name, 0o444, parent, vcpu, simple_attribute_fops(get, None, fmt))
