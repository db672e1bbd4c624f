"""Files every tool reads right: entry types from readdir, what each copying tool gets (checked against the
README's table), 32 readers blocked at once all served, a bug answered EIO with its traceback logged."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
from conftest import REPO, Mount, force_unmount, mount_env, wait_until
from fuse_tree_server import BUG_MESSAGE

from kvmdbgfs.control.client import request
from kvmdbgfs.fuse import GENERATED_FILE_SIZE

READERS = 32
SERVE_TIMEOUT_S = 60.0


@pytest.fixture
def vm_mount(mount_factory) -> tuple[Mount, str]:
    """An empty host with one shadow-MMU VM (its mmu_rmaps_stat has text), manual clock."""
    mount = mount_factory("--scenario", "empty")
    return mount, request(mount.control, "vm.create", memory="64M", vcpus=1)["name"]


def test_readdir_gives_each_entry_its_type(vm_mount: tuple[Mount, str]) -> None:
    """A directory listed, then removed: its entry still says directory (d_type), where DT_UNKNOWN would
    send the caller to stat() a name that is gone and call it a file."""
    mount, name = vm_mount
    entries = {entry.name: entry for entry in os.scandir(mount.path)}
    request(mount.control, "vm.destroy", name=name)
    assert wait_until(lambda: not (mount.path / name).exists())
    assert entries[name].is_dir(follow_symlinks=False) and not entries[name].is_file(follow_symlinks=False)
    assert entries["exits"].is_file(follow_symlinks=False) and not entries["exits"].is_dir(follow_symlinks=False)


def test_root_is_0755_like_the_kvm_directory(vm_mount: tuple[Mount, str]) -> None:
    mount, name = vm_mount
    assert [oct(os.stat(path).st_mode & 0o7777) for path in (mount.path, mount.path / name)] == ["0o755"] * 2


IN_CREATE, IN_DELETE, IN_ALL_EVENTS = 0x100, 0x200, 0xFFF


def test_no_inotify_events_for_vm_directories(vm_mount: tuple[Mount, str]) -> None:
    """README: debugfs raises IN_CREATE/IN_DELETE in kvm/ as VMs come and go; FUSE cannot. A watcher sees
    only its own opens and reads of the directory."""
    mount, first = vm_mount
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0 and libc.inotify_add_watch(fd, str(mount.path).encode(), IN_ALL_EVENTS) >= 0
    try:
        second = request(mount.control, "vm.create", memory="64M", vcpus=1)["name"]
        request(mount.control, "vm.destroy", name=first)
        assert second in os.listdir(mount.path) and first not in os.listdir(mount.path)
        masks = []
        while select.select([fd], [], [], 0.5)[0]:
            events = os.read(fd, 4096)
            while events:
                _wd, mask, _cookie, length = struct.unpack_from("iIII", events)
                masks.append(mask)
                events = events[16 + length :]
        assert masks and not [mask for mask in masks if mask & (IN_CREATE | IN_DELETE)]
    finally:
        os.close(fd)


# What the README says each tool gets, checked here: the table under "Tools and copying".

def readme_tool_table() -> dict[str, str]:
    """The README's rows: the tool (first code span of the first cell) -> what it gets (first code span of
    the second cell: text, padded or nothing)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Tools and copying", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and (tool := re.match(r"`([^`]+)`", cells[0])) and (got := re.search(r"`(\w+)`", cells[1])):
            rows[tool.group(1)] = got.group(1)
    return rows


def _run(*argv: str) -> int:
    return subprocess.run(argv, capture_output=True, timeout=60, check=False).returncode


def _shell_copy(command: str) -> Callable[[Path, Path], int]:
    return lambda source, out: _run("sh", "-c", command.format(source=source, out=out))


def _python_copy(copy: Callable[[Path, Path], object]) -> Callable[[Path, Path], int]:
    def run(source: Path, out: Path) -> int:
        copy(source, out)
        return 0

    return run


def _sendfile(source: Path, out: Path) -> None:
    with source.open("rb") as src, out.open("wb") as dst:
        offset = 0
        while sent := os.sendfile(dst.fileno(), src.fileno(), offset, 1 << 16):
            offset += sent


def _pread_after_a_read(source: Path, out: Path) -> None:
    fd = os.open(source, os.O_RDONLY)
    try:
        first = os.read(fd, 1)
        out.write_bytes(first + os.pread(fd, 1 << 16, 1))
    finally:
        os.close(fd)


def _kvm_stat_reader(source: Path, out: Path) -> None:
    """Open once, then seek(0) and read at every interval (three here); all three must agree."""
    with source.open("rb") as file:
        texts = set()
        for _ in range(3):
            file.seek(0)
            texts.add(file.read())
    out.write_bytes(texts.pop() if len(texts) == 1 else b"disagreeing reads")


def _tar(source: Path, out: Path) -> int:
    archive = out.with_suffix(".tar")
    status = _run("tar", "-cf", str(archive), "-C", str(source.parent), source.name)
    extract = out.parent / "extracted"
    extract.mkdir(exist_ok=True)
    _run("tar", "-xf", str(archive), "-C", str(extract))
    if (extract / source.name).exists():
        shutil.move(extract / source.name, out)
    return status


def _mmap_private(source: Path, out: Path) -> None:
    with source.open("rb") as file, mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as m:
        out.write_bytes(m[:])


def _wc_c(source: Path, out: Path) -> int:
    result = subprocess.run(["wc", "-c", str(source)], capture_output=True, text=True, timeout=60, check=False)
    out.write_bytes(b"x" * int(result.stdout.split()[0]))  # the count, as that many bytes
    return result.returncode


TOOLS: dict[str, Callable[[Path, Path], int | None]] = {
    "cat": _shell_copy("cat {source} > {out}"),
    "cp": _shell_copy("cp {source} {out}"),
    "dd": _shell_copy("dd if={source} of={out} status=none"),
    "head": _shell_copy("head -c 100000 {source} > {out}"),
    "wc -c": _wc_c,
    "open().read()": _python_copy(lambda source, out: out.write_bytes(source.read_bytes())),
    "os.pread": _pread_after_a_read,
    "kvm_stat-style reader": _kvm_stat_reader,
    "shutil.copy": _python_copy(shutil.copy),
    "os.sendfile": _sendfile,
    "tar": _tar,
    "rsync": _shell_copy("rsync {source} {out}"),
    "mmap": _mmap_private,
}


def _expected(got: str, text: bytes) -> bytes:
    return {"text": text, "padded": text.ljust(GENERATED_FILE_SIZE, b"\0"), "nothing": b""}[got]


def test_the_readme_table_names_every_tool_tested() -> None:
    assert set(readme_tool_table()) == set(TOOLS) | {"shutil.copytree"}


@pytest.mark.skipif(shutil.which("rsync") is None or shutil.which("tar") is None, reason="needs tar and rsync")
def test_each_tool_gets_what_the_readme_says(vm_mount: tuple[Mount, str], tmp_path: Path) -> None:
    """On a stat (simple_attr) and on mmu_rmaps_stat (seq_file): the text, the text padded with NULs to the
    reported size, or nothing and a non-zero exit."""
    mount, name = vm_mount
    table = readme_tool_table()
    sources = [mount.path / "exits", mount.path / name / "mmu_rmaps_stat"]
    seen = {}
    for tool, copy in TOOLS.items():
        for source in sources:
            text = source.read_bytes()
            out = tmp_path / tool.replace(" ", "_") / source.name
            out.parent.mkdir(exist_ok=True)
            status = copy(source, out)
            content = out.read_bytes() if out.exists() else b""
            expected = _expected(table[tool], text)
            if tool == "wc -c":
                expected = b"x" * len(text)
            seen[tool, source.name] = (content == expected, status != 0 if table[tool] == "nothing" else True)
    assert {key: value for key, value in seen.items() if value != (True, True)} == {}


def test_shutil_copytree_copies_every_file(vm_mount: tuple[Mount, str], tmp_path: Path) -> None:
    mount, name = vm_mount
    assert readme_tool_table()["shutil.copytree"] == "text"
    source, copy = mount.path / name, tmp_path / "copy"
    shutil.copytree(source, copy)
    files = sorted(path.relative_to(source) for path in source.rglob("*") if path.is_file())
    assert len(files) > 50
    assert max(len(path.read_bytes()) for path in source.rglob("*") if path.is_file()) < GENERATED_FILE_SIZE
    assert [path for path in files if (copy / path).read_bytes() != (source / path).read_bytes()] == []


# A test tree served by the adapter in a subprocess (tests/fuse_tree_server.py).

@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The test tree's mountpoint and the server's log (its stderr)."""
    mountpoint, log = tmp_path / "mnt", tmp_path / "server.log"
    mountpoint.mkdir()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fuse_tree_server.py"), str(mountpoint), str(READERS)],
        env=mount_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    try:
        served = wait_until(lambda: process.poll() is not None or _readable(mountpoint / "ready"), SERVE_TIMEOUT_S)
        assert served and process.poll() is None, log.read_text()
        yield mountpoint, log
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        force_unmount(mountpoint)


def _readable(path: Path) -> bool:
    try:
        return path.read_bytes() == b"ready\n"
    except OSError:
        return False


def _read(path: Path) -> bytes:
    """open, read, close: no fstat, so the only request that waits is the read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def test_32_readers_blocked_in_their_generation_are_all_served(tree: tuple[Path, Path]) -> None:
    """Each file's generation waits until all 32 are under way: with libfuse's default of 10 requests at once
    none would be served before the barrier's 30 s bound broke it (EIO)."""
    mountpoint, _log = tree
    with ThreadPoolExecutor(READERS) as pool:
        futures = [pool.submit(_read, mountpoint / "barrier" / f"file{index}") for index in range(READERS)]
        done, pending = wait(futures, timeout=SERVE_TIMEOUT_S)
        assert not pending, f"{len(pending)} of {READERS} readers still blocked"
    assert [future.result() for future in futures] == [f"served {index}\n".encode() for index in range(READERS)]


def test_a_bug_answers_eio_with_its_traceback_logged(tree: tuple[Path, Path]) -> None:
    mountpoint, log = tree
    with pytest.raises(OSError) as caught:
        _read(mountpoint / "broken")
    assert caught.value.errno == errno.EIO
    assert wait_until(lambda: BUG_MESSAGE in log.read_text())
    logged = log.read_text()
    assert "Traceback" in logged and "failed; answering EIO" in logged, logged
    assert "Ignoring invalid" not in logged  # libfuse took the thread options as they are
    # A bad write (no write method) still answers EINVAL: the two stay apart.
    fd = os.open(mountpoint / "ready", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as caught:
            os.write(fd, b"1\n")
        assert caught.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def _sendfile_once(fd: int) -> bytes:
    """What one os.sendfile from offset 0 of ``fd`` carries."""
    read_end, write_end = os.pipe()
    try:
        os.sendfile(write_end, fd, 0, GENERATED_FILE_SIZE)
        os.close(write_end)
        write_end = -1
        return os.read(read_end, GENERATED_FILE_SIZE)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_reads_from_0_regenerate_and_sendfile_repeats_its_first_text(tree: tuple[Path, Path]) -> None:
    """``counter`` counts its generations. A read from offset 0 regenerates, on one open as on many (a
    kvm_stat-style reader sees every change); a splice is served from the page cache, so sendfile on one open
    repeats the text it first carried, and a new open carries fresh text (README, "Tools and copying")."""
    counter = tree[0] / "counter"
    fd = os.open(counter, os.O_RDONLY)
    try:
        assert [_sendfile_once(fd), _sendfile_once(fd)] == [b"1\n", b"1\n"]
        assert [os.pread(fd, 100, 0), os.pread(fd, 100, 0)] == [b"2\n", b"3\n"]
        assert _sendfile_once(fd) == b"1\n"
    finally:
        os.close(fd)
    fd = os.open(counter, os.O_RDONLY)
    try:
        assert _sendfile_once(fd) == b"4\n"
    finally:
        os.close(fd)
