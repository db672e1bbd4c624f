"""The emulated host: vm_list, VM creation and destruction, the kvm debugfs directory."""

from __future__ import annotations

import re
import threading

import numpy as np

from kvmdbgfs.debugfs.dentry import Dentry, new_root
from kvmdbgfs.kvm.arch_hooks import KvmArchFactory
from kvmdbgfs.kvm.debugfs import kvm_create_vcpu_debugfs, kvm_create_vm_debugfs, kvm_destroy_vm_debugfs, kvm_init_debug
from kvmdbgfs.kvm.profiles import ALL_VCPU_STATS, DEFAULT_PROFILE, get_profile
from kvmdbgfs.kvm.stats import StatBlock
from kvmdbgfs.kvm.vcpu import KvmVcpu
from kvmdbgfs.kvm.vm import MMU_MODES, Kvm, VmConfig

MIN_MEMORY = 64 << 20
MAX_MEMORY = 64 << 30
MAX_VCPUS = 1024  # KVM_MAX_VCPUS
# ASCII only: Python's \d and int() would also take other scripts' digits and '_' separators.
_SIZE = re.compile(r"^\s*([0-9]+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE | re.ASCII)
_INT = re.compile(r"^-?[0-9]+$", re.ASCII)


def parse_int(text: str) -> int:
    """A whole number written in ASCII digits (an optional '-'); ValueError otherwise."""
    if not _INT.match(text):
        raise ValueError(f"not a whole number: {text!r}")
    return int(text)


def parse_memory(text: str | int) -> int:
    """'6G', '512M', '1048576K' or a byte count, as QEMU's -m takes it (suffixes are powers of 1024)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"bad memory size {text!r} (examples: 6G, 512M)")
    number, suffix = parse_int(match.group(1)), match.group(2).upper()
    return number << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[suffix]


def require_type(name: str, value: object, types: type | tuple[type, ...]) -> None:
    """A ValueError naming the field when a value has the wrong type (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, types):
        raise ValueError(f"{name} has the wrong type: {value!r}")


def validate_config(config: VmConfig) -> None:
    """Reject a VM configuration before anything is created."""
    if not MIN_MEMORY <= config.memory <= MAX_MEMORY or config.memory % 4096:
        raise ValueError(
            f"memory must be a multiple of 4 KiB between {MIN_MEMORY >> 20} MiB and {MAX_MEMORY >> 30} GiB"
        )
    if not 1 <= config.vcpus <= MAX_VCPUS:
        raise ValueError(f"vcpus must be between 1 and {MAX_VCPUS}")
    if config.mmu not in MMU_MODES:
        raise ValueError(f"unknown MMU mode {config.mmu!r} (known: {', '.join(MMU_MODES)})")
    get_profile(config.kernel)
    if config.seed is not None and not 0 <= config.seed < 2**63:
        raise ValueError("seed must be between 0 and 2**63-1")


class KvmHost:
    """The host kernel's KVM module: one kvm debugfs directory and the VMs on vm_list.

    ``arch_factory`` is kvm_arch_init_vm() of the architecture the host runs on.
    What userspace owns (QEMU's pid, the VM fd, the memslot layout, the guest)
    lives in ``kvmdbgfs/vmm``; the host's own randomness (its TSC) comes from
    the host seed, so a scenario replays byte for byte.
    """

    def __init__(self, arch_factory: KvmArchFactory, profile: str = DEFAULT_PROFILE, seed: int = 0) -> None:
        self.arch_factory = arch_factory
        self.profile = get_profile(profile)
        self.seed = seed
        self.kvm_lock = threading.RLock()
        self.vm_list: list[Kvm] = []
        self.debugfs_dir: Dentry = new_root()
        self._rng = np.random.default_rng(seed)
        self._host_tsc = int(self._rng.integers(1 << 40, 1 << 44))
        kvm_init_debug(self)

    def make_config(
        self,
        memory: str | int = "6G",
        vcpus: int = 2,
        mmu: str = "shadow",
        kernel: str | None = None,
        seed: int | None = None,
        rmap_design: str | None = None,
    ) -> VmConfig:
        """A validated VmConfig; the kernel defaults to the host's. A seed left out is derived at creation."""
        require_type("memory", memory, (str, int))
        require_type("vcpus", vcpus, int)
        require_type("mmu", mmu, str)
        for name, value in (("kernel", kernel), ("rmap_design", rmap_design)):
            require_type(name, value, (str, type(None)))
        require_type("seed", seed, (int, type(None)))
        config = VmConfig(
            memory=parse_memory(memory),
            vcpus=vcpus,
            mmu=mmu,
            kernel=kernel if kernel is not None else self.profile.name,
            seed=seed,
            rmap_design=rmap_design,
        )
        self.validate_config(config)
        return config

    def validate_config(self, config: VmConfig) -> None:
        """Everything KVM_CREATE_VM would refuse, generic and arch checks alike (ValueError)."""
        validate_config(config)
        self.arch_factory.kvm_arch_check_config(config)

    def kvm_create_vm(self, config: VmConfig, fdname: str) -> Kvm:
        """kvm_create_vm(): build the VM and its arch state, put it on vm_list, create its debugfs directory.

        ``fdname`` is what QEMU's KVM_CREATE_VM names the directory after: ``<pid>-<fd>``."""
        self.validate_config(config)
        profile = get_profile(config.kernel)
        with self.kvm_lock:
            kvm = Kvm(self, config, profile, fdname)
            kvm.arch = self.arch_factory(kvm)
            self.vm_list.append(kvm)
            kvm_create_vm_debugfs(kvm)
        return kvm

    def kvm_vm_ioctl_create_vcpu(self, kvm: Kvm, vcpu_id: int) -> KvmVcpu:
        """KVM_CREATE_VCPU: the guest TSC starts at 0, so the offset is minus the host TSC."""
        with self.kvm_lock:
            self._host_tsc += int(self._rng.integers(1 << 20, 1 << 24))
            tsc = self._host_tsc
        vcpu = KvmVcpu(kvm, vcpu_id, StatBlock(ALL_VCPU_STATS), tsc_offset=-tsc)
        kvm.arch.kvm_arch_vcpu_create(vcpu)
        kvm.vcpus.append(vcpu)
        kvm_create_vcpu_debugfs(vcpu)
        return vcpu

    def find_vm(self, name: str) -> Kvm:
        """The VM on vm_list whose debugfs directory is ``name``."""
        with self.kvm_lock:
            for kvm in self.vm_list:
                if kvm.name == name:
                    return kvm
        raise LookupError(f"no VM named {name!r}")

    def kvm_destroy_vm(self, kvm: Kvm) -> None:
        """kvm_destroy_vm(): debugfs first, then off vm_list, then the arch state is torn down."""
        kvm_destroy_vm_debugfs(kvm)
        with self.kvm_lock:
            self.vm_list.remove(kvm)
        kvm.arch.kvm_arch_destroy_vm()
