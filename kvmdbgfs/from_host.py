"""`kvmdbgfs profile --from-host`: a kernel profile read from the KVM of the kernel this machine runs.

It does what a VMM does to read binary stats (Documentation/virt/kvm/api.rst, KVM_GET_STATS_FD): opens
/dev/kvm, creates an empty VM and one vCPU, and reads each one's stats descriptors (struct kvm_stats_header,
then struct kvm_stats_desc + name per stat, include/uapi/linux/kvm.h). The descriptors give the stat files, in
table order, with their types (so their modes); the kernel's release (uname -r) gives the rest of the tree
(``mmu_rmaps_stat`` from 5.15, the vCPU ``pid`` file from 6.0) and the built-in profile whose rules it runs;
KVM_CHECK_EXTENSION(KVM_CAP_TSC_CONTROL) gives the TSC-scaling files.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
from dataclasses import dataclass

from kvmdbgfs.kvm.profile_file import ProfileError, ProfileFile
from kvmdbgfs.kvm.stats import StatDesc, StatType

KVMIO = 0xAE
KVM_GET_API_VERSION = KVMIO << 8 | 0x00
KVM_CREATE_VM = KVMIO << 8 | 0x01
KVM_CHECK_EXTENSION = KVMIO << 8 | 0x03
KVM_CREATE_VCPU = KVMIO << 8 | 0x41
KVM_GET_STATS_FD = KVMIO << 8 | 0xCE
KVM_API_VERSION = 12
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_BINARY_STATS_FD = 203

# struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset, data_offset.
STATS_HEADER = struct.Struct("<6I")
# struct kvm_stats_desc before its name: flags, exponent, size, offset, bucket_size.
STATS_DESC = struct.Struct("<IhHII")
KVM_STATS_TYPE_MASK = 0xF
MAX_DESCRIPTORS = 4096
MAX_NAME_SIZE = 4096

# The built-in profile whose rules a release runs: the newest one not newer than it.
RULES_BY_VERSION = (
    ((5, 14), "v5.14"),
    ((5, 15), "v5.15"),
    ((6, 1), "v6.1"),
    ((6, 4), "v6.4"),
    ((6, 6), "v6.6"),
    ((6, 12), "v6.12"),
    ((6, 13), "latest"),
)
MMU_RMAPS_STAT_SINCE = (5, 15)  # 3bcd0662d66f "KVM: X86: Introduce mmu_rmaps_stat per-vm debugfs file"
VCPU_PID_SINCE = (6, 0)  # e36de87d34a7 "KVM: debugfs: expose pid of vcpu threads"


@dataclass(frozen=True)
class KvmStatsDesc:
    """One struct kvm_stats_desc and its name."""

    name: str
    flags: int
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def type(self) -> StatType:
        kind = self.flags & KVM_STATS_TYPE_MASK
        try:
            return StatType(kind)
        except ValueError:
            raise ProfileError(f"stat {self.name}: unknown type {kind}") from None


def read_stats_descriptors(fd: int) -> tuple[str, list[KvmStatsDesc]]:
    """The id string and the descriptors of a binary stats file (what KVM_GET_STATS_FD returns)."""
    header = _pread(fd, STATS_HEADER.size, 0)
    _flags, name_size, num_desc, id_offset, desc_offset, _data_offset = STATS_HEADER.unpack(header)
    if not 0 < name_size <= MAX_NAME_SIZE or num_desc > MAX_DESCRIPTORS:
        raise ProfileError(f"stats header makes no sense: name_size {name_size}, num_desc {num_desc}")
    stats_id = _c_string(_pread(fd, name_size, id_offset))
    stride = STATS_DESC.size + name_size
    table = _pread(fd, stride * num_desc, desc_offset)
    descs = []
    for index in range(num_desc):
        entry = table[index * stride : (index + 1) * stride]
        flags, exponent, size, offset, bucket_size = STATS_DESC.unpack_from(entry)
        name = _c_string(entry[STATS_DESC.size :])
        descs.append(KvmStatsDesc(name, flags, exponent, size, offset, bucket_size))
    return stats_id, descs


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ProfileError(f"stats file ends at byte {offset + len(data)}, {size} bytes wanted at {offset}")
    return data


def _c_string(raw: bytes) -> str:
    text = raw.split(b"\0", 1)[0]
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise ProfileError(f"stats name is not ASCII: {text!r}") from None


def stat_descs(descs: list[KvmStatsDesc]) -> tuple[StatDesc, ...]:
    return tuple(StatDesc(desc.name, desc.type) for desc in descs)


def release_version(release: str) -> tuple[int, int]:
    """(major, minor) of a uname release such as ``6.18.44-fc``."""
    match = re.match(r"^([0-9]+)\.([0-9]+)", release)
    if not match:
        raise ProfileError(f"kernel release {release!r} has no version number")
    return int(match.group(1)), int(match.group(2))


def rules_for(version: tuple[int, int]) -> str:
    """The built-in profile whose rules a kernel of ``version`` runs."""
    chosen = [name for since, name in RULES_BY_VERSION if version >= since]
    if not chosen:
        raise ProfileError(f"kernel {version[0]}.{version[1]} is older than any profile (5.14)")
    return chosen[-1]


def profile_from_descriptors(
    release: str, vm_descs: list[KvmStatsDesc], vcpu_descs: list[KvmStatsDesc], tsc_scaling: bool
) -> ProfileFile:
    """The profile of a kernel: its release, its VM and vCPU descriptors, and its TSC-scaling capability."""
    version = release_version(release)
    name = "host-" + re.sub(r"[^A-Za-z0-9_.-]", "_", release)
    return ProfileFile(
        name=name,
        release=release,
        rules=rules_for(version),
        vm_stats=stat_descs(vm_descs),
        vcpu_stats=stat_descs(vcpu_descs),
        mmu_rmaps_stat=version >= MMU_RMAPS_STAT_SINCE,
        vcpu_pid=version >= VCPU_PID_SINCE,
        tsc_scaling=tsc_scaling,
    )


def _ioctl(fd: int, request: int, arg: int, what: str) -> int:
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise ProfileError(f"{what} failed: {exc.strerror or exc}") from None


def _stats_of(fd: int, what: str) -> list[KvmStatsDesc]:
    stats_fd = _ioctl(fd, KVM_GET_STATS_FD, 0, f"KVM_GET_STATS_FD on the {what}")
    try:
        return read_stats_descriptors(stats_fd)[1]
    finally:
        os.close(stats_fd)


def profile_from_host(device: str = "/dev/kvm") -> ProfileFile:
    """Read this machine's KVM: an empty VM and one vCPU, their descriptors, its release and capabilities."""
    try:
        kvm_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ProfileError(f"cannot open {device}: {exc.strerror or exc} (is KVM loaded and may you use it?)") from None
    fds = [kvm_fd]
    try:
        if _ioctl(kvm_fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION") != KVM_API_VERSION:
            raise ProfileError(f"{device}: KVM API version is not {KVM_API_VERSION}")
        if _ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_BINARY_STATS_FD, "KVM_CHECK_EXTENSION") <= 0:
            raise ProfileError(f"{device}: no KVM_CAP_BINARY_STATS_FD (the kernel is older than 5.14)")
        tsc_scaling = _ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_TSC_CONTROL, "KVM_CHECK_EXTENSION") > 0
        vm_fd = _ioctl(kvm_fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        fds.append(vm_fd)
        vcpu_fd = _ioctl(vm_fd, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU")
        fds.append(vcpu_fd)
        vm_descs, vcpu_descs = _stats_of(vm_fd, "VM"), _stats_of(vcpu_fd, "vCPU")
    finally:
        for fd in reversed(fds):
            os.close(fd)
    return profile_from_descriptors(os.uname().release, vm_descs, vcpu_descs, tsc_scaling)
