"""The emulated host: vm_list, VM creation and destruction, the kvm debugfs directory."""

from __future__ import annotations

import re
import threading
from dataclasses import replace

import numpy as np

from kvmdbgfs.arch.x86.kvm_arch import KvmArch
from kvmdbgfs.arch.x86.mmu.pte_list import PTE_LIST_DESIGNS
from kvmdbgfs.debugfs.dentry import Dentry, new_root
from kvmdbgfs.kvm.debugfs import kvm_create_vcpu_debugfs, kvm_create_vm_debugfs, kvm_destroy_vm_debugfs, kvm_init_debug
from kvmdbgfs.kvm.profiles import ALL_VCPU_STATS, DEFAULT_PROFILE, get_profile
from kvmdbgfs.kvm.stats import StatBlock
from kvmdbgfs.kvm.vcpu import KvmVcpu
from kvmdbgfs.kvm.vm import MMU_MODES, Kvm, VmConfig

MIN_MEMORY = 64 << 20
MAX_MEMORY = 64 << 30
MAX_VCPUS = 1024  # KVM_MAX_VCPUS
PID_MAX = 4194304  # pid_max on 64-bit
RESERVED_PIDS = 300
FIRST_VM_FD = 10
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_memory(text: str | int) -> int:
    """'6G', '512M', '1048576K' or a byte count, as QEMU's -m takes it (suffixes are powers of 1024)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"bad memory size {text!r} (examples: 6G, 512M)")
    number, suffix = int(match.group(1)), match.group(2).upper()
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
    if config.rmap_design is not None and config.rmap_design not in PTE_LIST_DESIGNS:
        raise ValueError(f"unknown rmap design {config.rmap_design!r} (known: {', '.join(PTE_LIST_DESIGNS)})")
    if config.seed is not None and not 0 <= config.seed < 2**63:
        raise ValueError("seed must be between 0 and 2**63-1")


class KvmHost:
    """The host kernel's KVM module: one kvm debugfs directory and the VMs on vm_list.

    Everything random (QEMU pids, fds, TSC values, per-VM seeds not given)
    comes from the host seed, so a scenario replays byte for byte.
    """

    def __init__(self, profile: str = DEFAULT_PROFILE, seed: int = 0) -> None:
        self.profile = get_profile(profile)
        self.seed = seed
        self.kvm_lock = threading.RLock()
        self.vm_list: list[Kvm] = []
        self.debugfs_dir: Dentry = new_root()
        self._rng = np.random.default_rng(seed)
        self._next_pid = 1000 + int(self._rng.integers(0, 3000))
        self._host_tsc = int(self._rng.integers(1 << 40, 1 << 44))
        self._vms_created = 0
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
        validate_config(config)
        return config

    def create_vm(self, config: VmConfig) -> Kvm:
        """kvm_create_vm() from a QEMU process: pick its pid and fd, build the VM, its vCPUs and debugfs."""
        validate_config(config)
        profile = get_profile(config.kernel)
        with self.kvm_lock:
            if config.seed is None:
                config = replace(config, seed=self.seed * 1_000_003 + self._vms_created)
            pid = self._alloc_pid(config.vcpus)
            fd = FIRST_VM_FD + int(self._rng.integers(0, 6))
            kvm = Kvm(self, config, profile, pid, fd)
            kvm.arch = KvmArch(kvm, config.rmap_design or profile.rmap_design)
            self._vms_created += 1
            self.vm_list.append(kvm)
            kvm_create_vm_debugfs(kvm)
            for vcpu_id in range(config.vcpus):
                self._create_vcpu(kvm, vcpu_id)
        return kvm

    def _create_vcpu(self, kvm: Kvm, vcpu_id: int) -> None:
        """kvm_vm_ioctl_create_vcpu(): the guest TSC starts at 0, so the offset is minus the host TSC."""
        self._host_tsc += int(self._rng.integers(1 << 20, 1 << 24))
        vcpu = KvmVcpu(kvm, vcpu_id, StatBlock(ALL_VCPU_STATS), tsc_offset=-self._host_tsc)
        # QEMU's main thread and its RCU thread come first, then one thread per vCPU.
        vcpu.pid = kvm.pid + 2 + vcpu_id
        kvm.vcpus.append(vcpu)
        kvm_create_vcpu_debugfs(vcpu)

    def _alloc_pid(self, threads: int) -> int:
        """A QEMU pid not used by a live VM, leaving room for its vCPU threads' pids."""
        in_use = {kvm.pid for kvm in self.vm_list}
        while True:
            pid = self._next_pid
            self._next_pid += 2 + threads + int(self._rng.integers(1, 64))
            if self._next_pid >= PID_MAX:
                self._next_pid = RESERVED_PIDS + 1
            if pid not in in_use and pid + 2 + threads < PID_MAX:
                return pid

    def find_vm(self, name: str) -> Kvm:
        """The VM on vm_list whose debugfs directory is ``name``."""
        with self.kvm_lock:
            for kvm in self.vm_list:
                if kvm.name == name:
                    return kvm
        raise LookupError(f"no VM named {name!r}")

    def destroy_vm(self, name: str) -> Kvm:
        """QEMU exits: drop the creator's reference. Open debugfs files keep the VM until closed."""
        with self.kvm_lock:
            kvm = self.find_vm(name)
            if kvm.creator_ref_dropped:
                raise LookupError(f"VM {name!r} is already destroyed (kept alive by open files)")
            kvm.creator_ref_dropped = True
        kvm.put_kvm()
        return kvm

    def kvm_destroy_vm(self, kvm: Kvm) -> None:
        """kvm_destroy_vm(): debugfs first, then off vm_list, then the MMU is torn down."""
        kvm_destroy_vm_debugfs(kvm)
        with self.kvm_lock:
            self.vm_list.remove(kvm)
        with kvm.mmu_lock:
            kvm.arch.destroy()
