"""Boot snapshots: the state of a VM after the first workload it ran (the guest's boot), kept on disk and
restored instead of emulated when a later VM would run exactly the same.

What a boot produces is determined by the key: a digest of the project's own source, the versions of Python
and numpy (the random streams and the pickle format), the host model, the VM's kernel profile, configuration and seed,
and the workload with its settings; a VM qualifies only while it is fresh (no workload ran, guest time 0). The
snapshot is everything the VM's objects hold (QEMU's side, struct kvm with the MMU, each vCPU) except what
names the VM on this host (pid, fd, directory, TSC offset, references to the host) and its locks: those stay
the live VM's, and a vCPU thread's id is this VM's thread's. Restoring therefore gives the same bytes in every file and the same behaviour afterwards.

An entry is one file: a header line (format, key, the digest of what follows and the size it inflates to) and
the zlib-compressed pickle. Large integer arrays that are mostly zeros (rmaps, shadow page pools: 85 of a
6 GiB guest's 87 MiB, most of it zeros) are pickled as their nonzero entries and rebuilt on fresh zero pages,
which makes the entry a quarter of the size to inflate, read and unpickle.
Unpickling runs code, so an entry is read only from a directory of the user's own that no one else may
write, only if it is the user's regular file, and only if its header names this key and its payload has the
stated digest; anything else is a warning and a miss. The directory is kept under a size cap by evicting the
entries used least recently.

The project's own objects are pickled with set_attributes() as their state setter (kvmdbgfs/instance_state.py):
restored, they keep their attributes inline, where the unpickler's dict update would leave every access to them
slower for good (CPython 3.11: rmap_fork 15%). Pickling asks each object for its __dict__, which does the same
to the live VM, so a saved VM goes on as its own restored copy (0.1-0.2 s for a 6 GiB guest).

A save pickles the VM on its own thread, at the end of the workload (the state must be that instant's); the
digest, the compression and the write then run on the cache's writer thread (hashlib and zlib let go of the
interpreter lock for large buffers), so the guest counts as booted without waiting for the disk. A restore of
a key still being written waits for that write first; the host waits for pending writes when it shuts down,
and the interpreter when it exits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import platform
import stat
import tempfile
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor, wait
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from kvmdbgfs import native
from kvmdbgfs.instance_state import set_attributes
from kvmdbgfs.kvm.host import KvmHost

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.kvm_arch import KvmArch
    from kvmdbgfs.vmm.qemu import QemuProcess

log = logging.getLogger(__name__)

FORMAT = "kvmdbgfs-boot-snapshot 2"
DEFAULT_MAX_BYTES = 1 << 30
COMPRESS_LEVEL = 1  # a 6 GiB guest's 92 MiB pickle becomes 3 MiB in 0.3 s; higher levels gain little
# Saving and restoring run on the VM's thread while the host serves readers. zlib and the unpickler hold the
# interpreter lock for a whole call (a 92 MiB payload: 0.25-0.6 s each, during which no FUSE or control request
# was answered; bench running, issue 10), so the payload is deflated, inflated and read back in pieces of at
# most this many bytes, each piece a call the interpreter can switch threads after. (The pickler calls
# persistent_id, Python code, for each object: it lets other threads in already.)
RESTORE_CHUNK = 1 << 20
_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()), threading.Condition, threading.Event)
# Types of which no root, host, clock or lock is an instance: persistent_id() answers them first (a 6 GiB
# guest's save asks it 275k times, four in five for one of these).
_PLAIN_TYPES = frozenset({str, int, bool, float, bytes, tuple, list, dict, set, frozenset, type(None), np.ndarray})
PROTOCOL = pickle.HIGHEST_PROTOCOL
PACKAGE = "kvmdbgfs."
SPARSE_MIN_BYTES = 1 << 16  # arrays this large are pickled by their nonzero entries when that is less than half
WRITE_WAIT_S = 30.0  # how long a restore or a shutdown waits for a pending write (0.2-0.4 s when quiet)

# One writer for every cache of the process: writes happen in the order saves were made, never two at once.
_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="boot cache writer")
_pending: dict[Path, Future[None]] = {}  # entry path -> its write, while it runs
_pending_lock = threading.Lock()

# What names a VM on its host, or is shared with the host: never saved, never overwritten.
KEEP: dict[str, frozenset[str]] = {
    "vm": frozenset(
        {"kvm", "pid", "fd", "name", "seed", "memory", "nr_vcpus", "clock", "created_ns", "vcpus", "jobs",
         "current", "boot_cache", "on_job_end", "_lock", "_stopping", "_thread", "guest_name", "vcpu_tids", "standin"}
    ),
    "kvm": frozenset(
        {"host", "config", "profile", "name", "users_count", "creator_ref_dropped", "debugfs_dentry", "vcpus",
         "_refcount_lock", "mmu_lock", "slots_lock"}
    ),
    "vcpu": frozenset({"kvm", "vcpu_id", "tsc_offset"}),
}


class SnapshotError(Exception):
    """The VM's state cannot be saved (something in it is not plain data)."""


def default_directory() -> Path:
    """$KVMDBGFS_CACHE_DIR, else $XDG_CACHE_HOME/kvmdbgfs, else ~/.cache/kvmdbgfs."""
    if explicit := os.environ.get("KVMDBGFS_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvmdbgfs"


_SOURCE_DIGEST = native.sources_digest(native.current_sources())  # the package and the workloads


def _roots(vm: QemuProcess) -> dict[tuple[str, int], Any]:
    """The VM's objects whose identity the rest of the host holds: QEMU's process, struct kvm, each vCPU."""
    return {("vm", 0): vm, ("kvm", 0): vm.kvm, **{("vcpu", v.vcpu_id): v for v in vm.kvm.vcpus}}


def _state(kind: str, root: Any) -> dict[str, Any]:
    return {name: value for name, value in vars(root).items() if name not in KEEP[kind]}


class _Saver(pickle.Pickler):
    """Pickles a VM's state; the host, the VM's own objects and locks go by reference."""

    def __init__(self, file: io.BytesIO, vm: QemuProcess) -> None:
        super().__init__(file, protocol=PROTOCOL)
        self._ids = {id(obj): key for key, obj in _roots(vm).items()}
        self._host, self._clock = vm.kvm.host, vm.clock

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) in _PLAIN_TYPES:
            return None
        if id(obj) in self._ids:
            return ("root", *self._ids[id(obj)])
        if obj is self._host:
            return ("host",)
        if obj is self._clock:
            return ("clock",)
        if isinstance(obj, _LOCK_TYPES):
            return ("lock", type(obj).__name__)
        if isinstance(obj, (KvmHost, threading.Thread)):
            raise SnapshotError(f"the VM's state holds a {type(obj).__name__}")
        return None

    def reducer_override(self, obj: Any) -> Any:
        """Arrays by ``_sparse``; an instance of the project's own classes with the default reduction gets its
        attributes back through set_attributes() (kvmdbgfs/instance_state.py); anything else as usual."""
        if type(obj) is np.ndarray:
            return self._sparse(obj)
        cls = type(obj)
        if (not cls.__module__.startswith(PACKAGE) or cls.__reduce_ex__ is not object.__reduce_ex__
                or cls.__reduce__ is not object.__reduce__):
            return NotImplemented
        if hasattr(obj, "__dict__"):
            if hasattr(cls, "__setstate__"):
                return NotImplemented
        elif not _is_frozen_dataclass(cls):
            # A class compiled by mypyc (kvmdbgfs/native.py): no __dict__, and a __setstate__ of its own that
            # sets each attribute, except through a frozen dataclass's __setattr__, which refuses.
            return NotImplemented
        reduced = obj.__reduce_ex__(PROTOCOL)
        if not isinstance(reduced[2], dict):
            return NotImplemented
        return (*reduced[:5], set_attributes)

    @staticmethod
    def _sparse(obj: np.ndarray) -> Any:
        """A large, mostly zero integer array as its nonzero entries (rebuilt by ``dense_array``); any other
        array as usual. (Floats keep every byte: -0.0 is not zero's bytes.)"""
        if obj.nbytes < SPARSE_MIN_BYTES or obj.dtype.kind not in "biu" or not obj.flags.c_contiguous:
            return NotImplemented
        flat = obj.reshape(-1)
        indices = np.flatnonzero(flat)
        if indices.size * (flat.itemsize + indices.itemsize) * 2 > obj.nbytes:
            return NotImplemented
        return dense_array, (obj.dtype.str, obj.shape, indices, flat[indices])


def _is_frozen_dataclass(cls: type) -> bool:
    params = getattr(cls, "__dataclass_params__", None)
    return bool(params is not None and params.frozen)


def dense_array(dtype: str, shape: tuple[int, ...], indices: np.ndarray, values: np.ndarray) -> np.ndarray:
    """An array _Saver.reducer_override() pickled sparse: zeros (pages the kernel gives zeroed, untouched until
    written), then ``values`` at the flat ``indices``."""
    array = np.zeros(shape, np.dtype(dtype))
    array.reshape(-1)[indices] = values
    return array


def _deflate(payload: bytes) -> bytes:
    """zlib.compress() at COMPRESS_LEVEL, RESTORE_CHUNK bytes of input per call."""
    deflater = zlib.compressobj(COMPRESS_LEVEL)
    view = memoryview(payload)
    pieces = [deflater.compress(view[start:start + RESTORE_CHUNK]) for start in range(0, len(view), RESTORE_CHUNK)]
    pieces.append(deflater.flush())
    return b"".join(pieces)


def _inflate(compressed: bytes) -> bytes:
    """zlib.decompress(), RESTORE_CHUNK bytes of output per call."""
    inflater = zlib.decompressobj()
    pieces = [inflater.decompress(compressed, RESTORE_CHUNK)]
    while inflater.unconsumed_tail:
        pieces.append(inflater.decompress(inflater.unconsumed_tail, RESTORE_CHUNK))
    pieces.append(inflater.flush())
    if not inflater.eof:
        raise zlib.error("incomplete or truncated stream")
    return b"".join(pieces)


class _ChunkedReader:
    """The payload as a file the unpickler reads through Python calls of at most RESTORE_CHUNK bytes."""

    def __init__(self, payload: bytes) -> None:
        self._file = io.BytesIO(payload)

    def read(self, size: int = -1) -> bytes:
        pieces = []
        while size and (piece := self._file.read(RESTORE_CHUNK if size < 0 else min(size, RESTORE_CHUNK))):
            pieces.append(piece)
            size -= len(piece) if size > 0 else 0
        return b"".join(pieces)

    def readline(self) -> bytes:
        return self._file.readline()


class _Loader(pickle.Unpickler):
    """Unpickles a VM's state onto a live VM: references resolve to its objects, locks are made anew."""

    _LOCKS = {"lock": threading.Lock, "RLock": threading.RLock, "Condition": threading.Condition,
              "Event": threading.Event}

    def __init__(self, file: _ChunkedReader, vm: QemuProcess) -> None:
        super().__init__(file)
        self._roots = _roots(vm)
        self._host, self._clock = vm.kvm.host, vm.clock

    def persistent_load(self, pid: Any) -> Any:
        match pid:
            case ("root", kind, index) if (kind, index) in self._roots:
                return self._roots[(kind, index)]
            case ("host",):
                return self._host
            case ("clock",):
                return self._clock
            case ("lock", name) if name in self._LOCKS:
                return self._LOCKS[name]()
        raise pickle.UnpicklingError(f"unknown reference {pid!r}")


class BootCache:
    """Boot snapshots in ``directory`` (made 0700 when missing), at most ``max_bytes`` of them."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.restored = 0  # boots restored so far

    def key(self, vm: QemuProcess, workload: str, settings: dict[str, Any]) -> str | None:
        """The key of this workload's run on ``vm``, or None when the VM is no longer fresh."""
        if vm.workload_runs or vm.guest is not None or vm.guest_ns:
            return None
        config = vm.kvm.config
        described = {
            "format": FORMAT,
            "source": _SOURCE_DIGEST,
            "python": platform.python_version(),
            "numpy": metadata.version("numpy"),
            "native": native.installed.name if native.installed else None,  # compiled modules pickle their own way
            "profile": repr(vm.kvm.profile),
            "host": repr(vm.kvm.host.arch_factory),
            "config": [config.memory, config.vcpus, config.mmu, config.rmap_design, vm.seed],
            "rmap_design": cast("KvmArch", vm.kvm.arch).rmaps.pte_list.name,  # an x86 VM's struct kvm_arch
            "workload": workload,
            "settings": settings,
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True, default=repr).encode()).hexdigest()

    def holds(self, key: str) -> bool:
        """An entry for ``key`` is on disk or being written (whether it is sound is restore()'s to find)."""
        path = self.directory / key
        with _pending_lock:
            if path in _pending:
                return True
        return path.is_file()

    # -- restore --------------------------------------------------------------------------------------------

    def restore(self, key: str, vm: QemuProcess) -> dict[str, Any] | None:
        """Put the snapshot's state onto ``vm`` and return the workload's summary, or None on a miss (a bad
        entry is a warning)."""
        path = self.directory / key
        wait_written([path])
        try:
            payload = self._read_trusted(path, key)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, zlib.error) as exc:
            log.warning("boot cache: ignoring %s: %s", path, exc)
            return None
        try:
            summary = self._put_back(vm, payload)
        except Exception as exc:  # an entry that cannot be applied is not trusted any further
            log.warning("boot cache: ignoring %s: %s", path, exc)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: evicted last
        self.restored += 1
        return summary

    def _read_trusted(self, path: Path, key: str) -> bytes:
        """The entry's payload, if the directory and file are the user's own and the header and digest agree."""
        self._check_directory(os.lstat(self.directory))
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                raise ValueError("not a regular file of the user's own")
            header = json.loads(handle.readline(4096))
            if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("key") != key:
                raise ValueError("written for another key or format")
            compressed = handle.read()
        if hashlib.sha256(compressed).hexdigest() != header.get("sha256"):
            raise ValueError("its payload does not match its digest (corrupt)")
        payload = _inflate(compressed)
        if len(payload) != header.get("size"):
            raise ValueError("its payload does not inflate to its stated size (corrupt)")
        return payload

    @staticmethod
    def _check_directory(info: os.stat_result) -> None:
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise ValueError("the cache directory is not a directory only the user can write")

    def _put_back(self, vm: QemuProcess, payload: bytes) -> dict[str, Any]:
        """Unpickle a snapshot's payload onto ``vm`` (restore, and a save's own copy); the workload's summary."""
        summary, states = _Loader(_ChunkedReader(payload), vm).load()
        self._apply(vm, states)
        return summary

    @staticmethod
    def _apply(vm: QemuProcess, states: dict[tuple[str, int], dict[str, Any]]) -> None:
        roots = _roots(vm)
        if set(states) != set(roots) or any(set(states[k]) != set(_state(k[0], roots[k])) for k in roots):
            raise ValueError("its VM has other objects than this one")
        with vm.kvm.mmu_lock:
            for key, root in roots.items():
                for name, value in states[key].items():
                    setattr(root, name, value)
            for vcpu in vm.kvm.vcpus:
                vcpu.pid = vm.vcpu_thread_pid(vcpu.vcpu_id) if vcpu.pid else 0

    # -- save -----------------------------------------------------------------------------------------------

    def save(self, key: str, vm: QemuProcess, summary: dict[str, Any]) -> None:
        """Snapshot the VM's state and the workload's summary now, put the snapshot's state back on the VM (its
        objects' attributes inline again), and queue the write under ``key`` (see the module's docstring); a
        failure is a warning."""
        try:
            buffer = io.BytesIO()
            states = {key_: _state(key_[0], root) for key_, root in _roots(vm).items()}
            _Saver(buffer, vm).dump((summary, states))
        except (SnapshotError, pickle.PicklingError, TypeError, AttributeError) as exc:
            log.warning("boot cache: not saving %s: %s", vm.name, exc)
            return
        payload = buffer.getvalue()
        self._put_back(vm, payload)
        path = self.directory / key
        with _pending_lock:
            write = _pending[path] = _writer.submit(self._write_entry, key, payload, vm.name)
        write.add_done_callback(lambda done: _forget(path, done))

    def _write_entry(self, key: str, payload: bytes, vm_name: str) -> None:
        """The writer thread's part of save(): header, compressed payload, eviction."""
        try:
            compressed = _deflate(payload)
            header = {"format": FORMAT, "key": key, "size": len(payload),
                      "sha256": hashlib.sha256(compressed).hexdigest()}
            self._write(key, json.dumps(header).encode() + b"\n" + compressed)
            self.evict()
        except (OSError, ValueError) as exc:
            log.warning("boot cache: not saving %s: %s", vm_name, exc)

    def _write(self, key: str, data: bytes) -> None:
        with contextlib.suppress(FileExistsError):
            os.makedirs(self.directory, 0o700)
        self._check_directory(os.lstat(self.directory))
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temporary, self.directory / key)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def flush(self) -> None:
        """Wait (WRITE_WAIT_S at most) for this cache's pending writes."""
        with _pending_lock:
            paths = [path for path in _pending if path.parent == self.directory]
        wait_written(paths)

    def entries(self) -> list[os.DirEntry[str]]:
        """The cache's entry files (partial writes excluded)."""
        try:
            with os.scandir(self.directory) as scan:
                return [e for e in scan if e.is_file(follow_symlinks=False) and not e.name.startswith(".")]
        except FileNotFoundError:
            return []

    def evict(self) -> None:
        """Remove the least recently used entries until the rest fit in ``max_bytes``."""
        entries = sorted(self.entries(), key=lambda e: e.stat().st_mtime_ns, reverse=True)
        total = 0
        for entry in entries:
            total += entry.stat().st_size
            if total > self.max_bytes:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def clear(self) -> int:
        """`kvmdbgfs cache clear`: remove every entry; how many there were."""
        entries = self.entries()
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        return len(entries)



def _forget(path: Path, write: Future[None]) -> None:
    with _pending_lock:
        if _pending.get(path) is write:
            del _pending[path]


def wait_written(paths: list[Path]) -> None:
    """Wait (WRITE_WAIT_S at most) until no write to these entries is pending; one still pending after that is
    a warning (a restore then reads what is on disk, or misses)."""
    with _pending_lock:
        writes = [_pending[path] for path in paths if path in _pending]
    if writes and wait(writes, WRITE_WAIT_S).not_done:
        log.warning("boot cache: a write still pending after %.0f s", WRITE_WAIT_S)
