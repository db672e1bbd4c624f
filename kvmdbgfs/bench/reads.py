"""Issue 14 benchmark, the read path: kvmdbgfs against a bare mfusepy filesystem mounted with the same options.

1. Reads per second of a VM's stat file (``<vm>/exits``) through mount.py serving the default scenario, booted,
   manual clock, by 1 and by 8 reader processes, against a constant of the same depth (``/vm/value``) served
   by kvmdbgfs.bench.bare_fs; the realtime-clock mount's figure beside them.
2. ``mmu_rmaps_stat`` of an idle 16 GiB shadow guest read through the mount, against the numpy floor (one
   numpy pass over the same head arrays, in this process, from the same deterministic boot) plus the bare
   filesystem's read of a file of that size.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np

from kvmdbgfs.arch.x86.debugfs import kvm_mmu_rmaps_stat_show
from kvmdbgfs.arch.x86.kvm_arch import KvmArch
from kvmdbgfs.bench.mounts import Served, bare_mounted, mounted, read_file, wait_booted
from kvmdbgfs.bench.report import Figure, at_least, at_most, interleaved_medians, timed
from kvmdbgfs.bench.rmap import read_heads
from kvmdbgfs.bench.running import idle_vm_scenario
from kvmdbgfs.kvm.profiles import DEFAULT_PROFILE
from kvmdbgfs.kvm.vm import Kvm
from kvmdbgfs.scenario import build_host, load_scenario
from kvmdbgfs.vmm.bootcache import BootCache
from kvmdbgfs.vmm.vmm import Vmm

TITLE = "issue 14: the read path (real FUSE mounts, the same mount options)"
READERS, WINDOW_S, ROUNDS = (1, 8), 1.0, 5
STAT_ROUNDS = 15
READS_RATIO, STAT_RATIO = 0.8, 3.0
BIG_GUEST = idle_vm_scenario(5, "16G", "")
BARE_FILE = "vm/value"
BOOT_TIMEOUT_S = 600.0


def count_reads(path: str, start_at: float, seconds: float) -> int:
    """One reader process: from ``start_at`` (CLOCK_MONOTONIC, shared by all processes), open + read to EOF +
    close ``path`` in a loop for ``seconds``; how many reads it made."""
    time.sleep(max(0.0, start_at - time.monotonic()))
    end, reads = start_at + seconds, 0
    while time.monotonic() < end:
        read_file(path)
        reads += 1
    return reads


def reads_per_second(pool: ProcessPoolExecutor, path: Path, readers: int) -> float:
    """``readers`` processes reading ``path`` at once for WINDOW_S: their reads per second together."""
    start_at = time.monotonic() + 0.05
    futures = [pool.submit(count_reads, str(path), start_at, WINDOW_S) for _ in range(readers)]
    return sum(future.result() for future in futures) / WINDOW_S


def stat_file(served: Served) -> Path:
    """The first VM's ``exits``: a stat file that sums over the VM's vCPUs."""
    return served.path / served.vms()[0]["name"] / "exits"


def read_rate_figures() -> tuple[list[Figure], list[str]]:
    with (bare_mounted() as bare, mounted("default", "manual") as manual, mounted("default", "realtime") as realtime,
          ProcessPoolExecutor(max(READERS), multiprocessing.get_context("forkserver")) as pool):
        for served in (manual, realtime):
            wait_booted(served)
        paths = {"bare": bare.path / BARE_FILE, "manual": stat_file(manual), "realtime": stat_file(realtime)}
        for path in paths.values():
            int(read_file(path))  # each serves a number
        reads_per_second(pool, paths["bare"], max(READERS))  # starts the pool's processes
        rates = {
            readers: interleaved_medians({name: partial(reads_per_second, pool, path, readers)
                                          for name, path in paths.items()}, ROUNDS)
            for readers in READERS
        }
    figures = []
    method = f"median of {ROUNDS} x {WINDOW_S:.0f} s"
    for readers, rate in rates.items():
        section = f"reads/s, {readers} reader{'s' if readers > 1 else ''}"
        for clock in ("manual", "realtime"):
            target = at_least(READS_RATIO) if clock == "manual" else None
            figures.append(Figure(section, f"<vm>/exits, {clock} clock", rate[clock], "reads/s", method,
                                  rate["bare"], "bare mfusepy", target))
    notes = [
        f"reads/s: reader processes each open + read to EOF + close in a loop ({WINDOW_S:.0f} s windows, bare, "
        f"manual and realtime interleaved, {ROUNDS} rounds); the bare filesystem (kvmdbgfs.bench.bare_fs) serves "
        f"a constant at /{BARE_FILE}, the depth of a VM's stat file, with kvmdbgfs.fuse.mount_options(); "
        "mount.py serves the default scenario, booted; the realtime row has no target (its idle guests run)",
        "mount.py's libfuse worker threads keep their Python thread states (kvmdbgfs.thread_state); the bare "
        "filesystem is plain mfusepy, whose every callback gets a new one from ctypes",
    ]
    return figures, notes


def booted_big_guest(cache: Path) -> Vmm:
    """The 16 GiB guest booted in this process, through the boot cache in ``cache``."""
    with tempfile.TemporaryDirectory(prefix="kvmdbgfs-bench-") as tmp:
        scenario_path = Path(tmp) / "scenario.toml"
        scenario_path.write_text(BIG_GUEST)
        vmm, boot = build_host(load_scenario(str(scenario_path)), DEFAULT_PROFILE, "manual", boot_cache=BootCache(cache))
    if not boot.wait(BOOT_TIMEOUT_S) or boot.error:
        vmm.shutdown()
        raise RuntimeError(f"the 16 GiB guest did not boot: {boot.error or 'timed out'}")
    return vmm


def stat_read_times(vmm: Vmm, cache: Path) -> tuple[dict[str, float], bytes, Kvm, list[np.ndarray]]:
    """mount.py serving the 16 GiB guest from ``cache``: the medians of its mmu_rmaps_stat read, of the numpy
    floor over ``vmm``'s guest (the same one: the same text) and of the bare read of as many bytes."""
    (kvm,) = vmm.host.vm_list
    memslots = cast(KvmArch, kvm.arch).memslots
    arrays = [heads for slot in memslots if slot.rmap is not None for heads in slot.rmap]
    with mounted(BIG_GUEST, "manual", env={"KVMDBGFS_CACHE_DIR": str(cache)}) as served:
        wait_booted(served)
        path = served.path / kvm.name / "mmu_rmaps_stat"
        text = read_file(path)
        if text.decode() != kvm_mmu_rmaps_stat_show(kvm):
            raise RuntimeError("the mount's guest is not the one booted here: the floor would not compare")
        with bare_mounted(len(text)) as bare:
            blob = bare.path / "blob"
            if len(read_file(blob)) != len(text):
                raise RuntimeError("the bare filesystem's blob has the wrong size")
            runs = {
                "mount": lambda: timed(lambda: read_file(path))[0],
                "floor": lambda: timed(lambda: read_heads(arrays))[0],
                "bare": lambda: timed(lambda: read_file(blob))[0],
            }
            return interleaved_medians(runs, STAT_ROUNDS), text, kvm, arrays


def rmaps_stat_figure() -> tuple[Figure, str]:
    """mmu_rmaps_stat of the 16 GiB guest through the mount against the numpy floor + the bare read. The
    guest here and mount.py's are both restored from one boot snapshot, so that their head arrays are the same
    kind of memory (an emulated boot leaves most of them untouched zero pages, a restored one real pages)."""
    with tempfile.TemporaryDirectory(prefix="kvmdbgfs-bench-cache-") as cache_dir:
        cache = Path(cache_dir)
        booted_big_guest(cache).shutdown()  # fills the cache
        vmm = booted_big_guest(cache)
        if vmm.boot_cache is None or vmm.boot_cache.restored != 1:
            vmm.shutdown()
            raise RuntimeError("the 16 GiB guest was not restored from its boot snapshot")
        try:
            seconds, text, kvm, arrays = stat_read_times(vmm, cache)
        finally:
            vmm.shutdown()
    heads = sum(len(a) for a in arrays)
    figure = Figure("mmu_rmaps_stat 16G", f"{kvm.name}/mmu_rmaps_stat, idle", seconds["mount"] * 1e3, "ms",
                    f"median of {STAT_ROUNDS}", (seconds["floor"] + seconds["bare"]) * 1e3, "floor + bare",
                    at_most(STAT_RATIO),
                    detail=f"numpy floor {seconds['floor'] * 1e3:.2f} ms + bare read {seconds['bare'] * 1e3:.2f} ms "
                           f"of {len(text)} bytes; {heads / 1e6:.2f}M heads")
    note = (f"mmu_rmaps_stat: an idle 16 GiB 2-vCPU shadow guest (manual clock) through mount.py; the floor is one "
            f"numpy pass over its {len(arrays)} head arrays in this process, as issue 3's floor; both guests are "
            "restored from one boot snapshot (the same file text, the same kind of memory); mount, floor and bare "
            f"read interleaved, {STAT_ROUNDS} rounds")
    return figure, note


def run() -> tuple[list[Figure], list[str]]:
    figures, notes = read_rate_figures()
    stat, note = rmaps_stat_figure()
    return [*figures, stat], [*notes, note]
