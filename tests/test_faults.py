"""Faults and attacks against mounts: what another local user can plant in shared directories, files that
are not the server's, servers racing for one socket, an impostor server, oversized requests, connection
floods, a silent server, suspended and interrupted clients, a killed server.

Each case ends with the server (or the next one) serving, nothing of anyone else's removed or written
through, and every wait bounded. The other user is uid 65534 ('nobody'): these tests run as root, as CI
does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    MOUNT_PY,
    REPO,
    Mount,
    assert_one_error_line,
    force_unmount,
    is_mounted,
    mount_env,
    mount_with_scenario,
    spawn_mount,
    start_mount,
    wait_served,
    wait_until,
)

from kvmdbgfs.control.client import request
from kvmdbgfs.control.listener import MAX_REQUEST_BYTES, MAX_WAITING, REQUEST_TIMEOUT_S
from kvmdbgfs.control.paths import UnsafeRuntimeDir, pointer_path, runtime_dir
from kvmdbgfs.control import wire

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="plays another user (uid 65534): needs root")

NOBODY = 65534
ERROR = "kvmdbgfs: error: "
REFUSAL_S = 5.0  # a refused mount.py is gone long before it could have booted a guest
READER_S = 5.0
SUSPEND_S = 10.0
FLOOD_S = 3.0
CPU_SHARE = 0.25  # of FLOOD_S the server may burn while flooded (a spinning accept loop burns all of it)
SQUATTED = "root's own file\n"


def run_mount_py(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """mount.py expected to refuse: its result and how long it took."""
    start = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, str(MOUNT_PY), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        force_unmount(Path(args[0]))
        pytest.fail(f"mount.py {' '.join(args)} did not exit: it mounted what it should have refused")
    return result, time.monotonic() - start


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvmdbgfs.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def entries(directory: Path) -> dict[str, str]:
    """What a directory holds: each name with its link target, or its kind."""
    paths = [directory / name for name in os.listdir(directory)]
    return {path.name: os.readlink(path) if path.is_symlink() else oct(path.lstat().st_mode) for path in paths}


def workload_of(mount: Mount, name: str) -> str | None:
    return {vm["name"]: vm["workload"] for vm in request(mount.control, "vm.list")}[name]


# -- the runtime directory ------------------------------------------------------------------------


RUNTIME_PROBLEMS: dict[str, tuple[Callable[[Path], None], str]] = {
    "group-access": (lambda path: path.mkdir(mode=0o750), "has mode 0750 (group or others have access)"),
    "not-a-directory": (lambda path: path.write_text(""), "is not a directory"),
    "dangling-link": (lambda path: path.symlink_to(path.parent / "gone"), "is a symbolic link"),
    "another-owner": (
        lambda path: (path.mkdir(mode=0o700), os.chown(path, NOBODY, NOBODY)),
        f"is owned by uid {NOBODY}, not 0",
    ),
}


@pytest.mark.parametrize("prepare, problem", RUNTIME_PROBLEMS.values(), ids=RUNTIME_PROBLEMS.keys())
def test_runtime_directory_is_used_only_if_private(tmp_path: Path, monkeypatch, prepare, problem: str) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    prepare(tmp_path / "kvmdbgfs")
    with pytest.raises(UnsafeRuntimeDir) as refused:
        runtime_dir()
    path = tmp_path / "kvmdbgfs"
    assert str(refused.value) == f"runtime directory {path} {problem}: not using it (use --control SOCKET)"


def test_runtime_directory_is_made_private(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    with pytest.raises(UnsafeRuntimeDir) as refused:
        runtime_dir()
    path = tmp_path / "missing" / "kvmdbgfs"
    assert str(refused.value) == f"runtime directory {path}: No such file or directory (use --control SOCKET)"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    made = runtime_dir()
    assert (made, made.stat().st_mode & 0o7777, made.stat().st_uid) == (tmp_path / "kvmdbgfs", 0o700, 0)


@pytest.fixture(params=["xdg", "tmpdir"])
def layout(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch) -> tuple[dict[str, str], Path, Path]:
    """(environment, runtime directory, pointer file of ``tmp_path``/mnt) with $XDG_RUNTIME_DIR set, or unset and
    $TMPDIR naming the fallback's parent (the real /tmp is left alone). The directory is made by kvmdbgfs itself;
    the tests then squat it."""
    base = tmp_path / "base"
    base.mkdir(mode=0o700)
    env = mount_env(base)
    if request.param == "xdg":
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    else:
        del env["XDG_RUNTIME_DIR"]
        env["TMPDIR"] = str(base)
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.setattr(tempfile, "tempdir", str(base))
    pointer = pointer_path(str(tmp_path / "mnt"))
    return env, pointer.parent, pointer


def _squat(directory: Path, pointer: Path, victim: Path) -> str:
    """nobody owns the directory, mode 0777, and planted the pointer as a link to a file of root's."""
    os.chown(directory, NOBODY, NOBODY)
    os.chmod(directory, 0o777)
    pointer.symlink_to(victim)
    os.lchown(pointer, NOBODY, NOBODY)
    return f"is owned by uid {NOBODY}, not 0"


def _link_away(directory: Path, pointer: Path, victim: Path) -> str:
    """The directory is a link to another one (private and root's: only the link is wrong), holding a planted
    pointer."""
    elsewhere = directory.parent / "elsewhere"
    directory.rename(elsewhere)
    directory.symlink_to(elsewhere)
    (elsewhere / pointer.name).symlink_to(victim)
    return "is a symbolic link"


@pytest.mark.parametrize("attack", [_squat, _link_away], ids=["squatted", "symlinked"])
def test_untrusted_runtime_directory_is_refused_before_booting(tmp_path: Path, layout, attack) -> None:
    """mount.py (with a scenario that would boot two 6 GiB guests) refuses at once with one line; the CLI refuses
    to talk; nothing there is written, followed or removed."""
    env, directory, pointer = layout
    victim = tmp_path / "victim"
    victim.write_text(SQUATTED)
    problem = attack(directory, pointer, victim)
    before = entries(directory)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    message = f"runtime directory {directory} {problem}: not using it (use --control SOCKET)"

    result, took = run_mount_py(env, str(mountpoint), "--scenario", "default")
    assert_one_error_line(result, 2, f"mount.py: error: {message}")
    assert took < REFUSAL_S and not is_mounted(mountpoint)
    assert_one_error_line(run_cli(env, "-m", str(mountpoint), "vm", "list"), 1, ERROR + message)
    assert (entries(directory), victim.read_text()) == (before, SQUATTED)


def test_control_option_works_beside_an_untrusted_runtime_directory(tmp_path: Path) -> None:
    """With --control the mount serves, says it wrote no pointer, and leaves the squatted directory alone."""
    squatted = tmp_path / "kvmdbgfs"  # start_mount() makes tmp_path the runtime directory's parent
    squatted.mkdir()
    os.chown(squatted, NOBODY, NOBODY)
    os.chmod(squatted, 0o777)
    mount = start_mount(tmp_path, "--scenario", "empty")
    try:
        message = f"runtime directory {squatted} is owned by uid {NOBODY}, not 0: not using it (use --control SOCKET)"
        assert f"mount.py: no pointer file for `kvmdbgfs -m`: {message}\n" in mount.stderr()
        assert_one_error_line(mount.cli("vm", "list", check=False), 1, ERROR + message)
        direct = run_cli(mount.env, "--control", str(mount.control), "status")
        assert direct.returncode == 0 and f"server_pid: {mount.process.pid}\n" in direct.stdout
    finally:
        mount.stop()
    assert os.listdir(squatted) == []


# -- files at the socket path ---------------------------------------------------------------------


def _dead_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))


def _nobodys_dead_socket(path: Path) -> None:
    _dead_socket(path)
    os.lchown(path, NOBODY, NOBODY)


FOREIGN_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "a-user-file": (lambda path: path.write_text(SQUATTED), "exists and is not a socket"),
    "another-users-dead-socket": (_nobodys_dead_socket, f"a socket of uid {NOBODY} is there"),
}


@pytest.mark.parametrize("plant, reason", FOREIGN_FILES.values(), ids=FOREIGN_FILES.keys())
def test_foreign_file_at_the_socket_path_is_refused_and_kept(tmp_path: Path, plant, reason: str) -> None:
    socket_path = tmp_path / "control.sock"
    plant(socket_path)
    before = socket_path.lstat()
    (tmp_path / "mnt").mkdir()
    result, took = run_mount_py(mount_env(tmp_path), str(tmp_path / "mnt"), "--control", str(socket_path))
    assert_one_error_line(result, 2, f"mount.py: error: control socket {socket_path}: {reason}")
    assert took < REFUSAL_S and not is_mounted(tmp_path / "mnt")
    after = socket_path.lstat()
    assert (after.st_ino, after.st_mode, after.st_uid) == (before.st_ino, before.st_mode, before.st_uid)
    assert os.listdir(tmp_path / "kvmdbgfs") == []  # no pointer left behind


def test_servers_sharing_a_socket_path_never_remove_each_others(tmp_path: Path) -> None:
    """Two servers race for one path (a dead socket of ours is there): one serves, the other refuses. After a tmp
    cleaner removed the winner's socket and a third server bound the path, stopping the winner leaves the third's
    socket; a user's file put where a server's socket was is left too."""
    shared = tmp_path / "shared.sock"
    _dead_socket(shared)
    mounts: list[Mount] = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        mounts.append(spawn_mount(tmp_path / name, "--scenario", "empty", control=shared))
    try:
        assert wait_until(lambda: any(mount.process.poll() is not None for mount in mounts), 30)
        (loser,) = [mount for mount in mounts if mount.process.poll() is not None]
        (winner,) = [mount for mount in mounts if mount is not loser]
        assert (loser.process.returncode, loser.stderr()) == (
            2,
            f"mount.py: error: control socket {shared}: another server is listening on it\n",
        )
        assert os.listdir(loser.path.parent / "kvmdbgfs") == []
        wait_served(winner)
        assert request(shared, "status")["server_pid"] == winner.process.pid

        shared.unlink()  # a tmp cleaner
        (tmp_path / "c").mkdir()
        third = start_mount(tmp_path / "c", "--scenario", "empty", control=shared)
        mounts.append(third)
        assert winner.stop() == 0
        assert request(shared, "status")["server_pid"] == third.process.pid
        assert os.listdir(winner.path.parent / "kvmdbgfs") == []  # its own pointer did go

        shared.unlink()
        shared.write_text(SQUATTED)
        assert third.stop() == 0
        assert shared.read_text() == SQUATTED
    finally:
        for mount in mounts:
            mount.stop()


# -- who is at the other end ----------------------------------------------------------------------

IMPOSTOR = r"""
import os, socket, sys
path = sys.argv[1]
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chown(path, 65534, 65534)
os.setgid(65534)
os.setuid(65534)
server.listen()  # its clients' SO_PEERCRED: the credentials it listens with
print("ready", flush=True)
server.settimeout(20)
conn, _ = server.accept()
conn.settimeout(5)
print(len(conn.recv(1 << 16)), flush=True)
try:
    conn.sendall(b'{"ok": true, "result": {"name": "6666-66"}}\n')
except BrokenPipeError:
    pass
"""


def test_cli_refuses_a_server_of_another_user(tmp_path: Path) -> None:
    """A socket owned and served by nobody: the CLI sends nothing and does not believe its answer."""
    path = tmp_path / "impostor.sock"
    impostor = subprocess.Popen([sys.executable, "-c", IMPOSTOR, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert impostor.stdout is not None and impostor.stdout.readline() == "ready\n"
        result = run_cli(mount_env(tmp_path), "--control", str(path), "vm", "create")
        assert_one_error_line(result, 1, f"{ERROR}the server at {path} runs as uid {NOBODY}, not 0: not talking to it")
        received, _ = impostor.communicate(timeout=20)
    finally:
        impostor.kill()
        impostor.wait()
    assert received == "0\n"  # the CLI hung up without a request


NOBODY_CLIENT = r"""
import os, socket, sys
os.chdir(sys.argv[1])  # while root: nobody could not walk the private directories above it
os.setgid(65534)
os.setuid(65534)
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    sock.settimeout(10)
    sock.connect(sys.argv[2])
    try:
        sock.sendall(b'{"cmd": "vm.list", "args": {}}\n')
    except BrokenPipeError:  # refused before it sent
        pass
    print(sock.makefile().readline(), end="")
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """A mount with no VMs for the tests that push on its control socket."""
    with mount_with_scenario(tmp_path_factory, "seed = 3\n") as running:
        yield running


def test_server_refuses_clients_of_another_user(served: Mount) -> None:
    """Even with the socket opened up to everyone, the server answers a client of another uid with one refusal."""
    directory = served.control.parent
    modes = [(path, path.stat().st_mode & 0o7777) for path in (directory, served.control)]
    os.chmod(directory, 0o711)
    os.chmod(served.control, 0o666)
    try:
        result = subprocess.run(
            [sys.executable, "-c", NOBODY_CLIENT, str(directory), served.control.name],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        for path, mode in modes:
            os.chmod(path, mode)
    assert json.loads(result.stdout) == {"ok": False, "error": "permission denied: this server answers uid 0 only"}
    assert request(served.control, "vm.list") == []


# -- a bounded control plane ----------------------------------------------------------------------


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` line of /proc/PID/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(f"{field}:"))


def test_oversized_requests_are_cut_off(served: Mount) -> None:
    """Five clients each send a 100 MiB line at once: each is told and cut off after about a MiB, the server's
    peak RSS barely moves, and it goes on answering."""
    rss_before = status_kib(served.process.pid, "VmRSS")
    answers: list[tuple[int, bytes]] = []

    def oversized() -> None:
        sent = 0
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(20)
            sock.connect(str(served.control))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                while sent < 100 << 20:
                    sock.sendall(b"x" * (1 << 20))
                    sent += 1 << 20
            answers.append((sent, sock.recv(1 << 16)))

    threads = [threading.Thread(target=oversized) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == 5, answers
    error = b'{"ok": false, "error": "request too large (over %d MiB)"}\n' % (MAX_REQUEST_BYTES >> 20)
    assert all(sent < 8 * MAX_REQUEST_BYTES and reply == error for sent, reply in answers), answers
    assert status_kib(served.process.pid, "VmHWM") - rss_before < 32 << 10
    assert request(served.control, "vm.list") == [] and "Traceback" not in served.stderr()


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(REQUEST_TIMEOUT_S + 5)
    sock.connect(str(path))
    return sock


def test_waiting_connections_are_capped_and_timed_out(served: Mount) -> None:
    """MAX_WAITING silent connections: one more is answered busy; the silent ones are closed after
    REQUEST_TIMEOUT_S; then requests are answered again."""
    opened = time.monotonic()
    silent = [connect(served.control) for _ in range(MAX_WAITING)]
    try:
        with connect(served.control) as extra:  # accepted after the silent ones: the cap is full
            refusal = json.loads(extra.makefile("rb").readline())
        assert refusal["ok"] is False and refusal["error"].startswith("busy: "), refusal
        assert [sock.recv(1) for sock in silent] == [b""] * MAX_WAITING
        assert time.monotonic() - opened < REQUEST_TIMEOUT_S + 2
    finally:
        for sock in silent:
            sock.close()
    assert request(served.control, "vm.list") == []


@pytest.mark.parametrize(
    "argv, goes_on",
    [(["status"], ""), (["run", "idle", "--vm", "1-10"], "; the workload goes on")],
    ids=["status", "run"],
)
def test_cli_gives_up_on_a_silent_server(tmp_path: Path, argv: list[str], goes_on: str) -> None:
    """A listening socket of ours that never answers (its backlog takes the connection): one line after --timeout."""
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen()
        start = time.monotonic()
        result = run_cli(mount_env(tmp_path), "--control", str(path), "--timeout", "0.5", *argv)
        took = time.monotonic() - start
    assert_one_error_line(result, 1, f"{ERROR}the server at {path} sent nothing for 0.5 s (--timeout){goes_on}")
    assert took < 10  # Python starts, waits 0.5 s, and gives up: not the 60 s run_cli() allows


def test_connecting_waits_while_the_backlog_is_full(tmp_path: Path) -> None:
    """A full backlog makes connect() on a socket with a timeout fail with EAGAIN at once (CI saw it after a
    connection flood); the client waits for the server to accept instead, and gives up with TimeoutError."""
    path = str(tmp_path / "full.sock")
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        listener.bind(path)
        listener.listen(0)
        queued = []
        while len(queued) < 64:
            sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sock.setblocking(False)
            try:
                sock.connect(path)
            except BlockingIOError:
                break
            queued.append(sock)
        assert len(queued) < 64, "the backlog never filled"
        late = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            wire.connect(late, path, 0.3)
        assert 0.3 <= time.monotonic() - start < 5
        accepter = threading.Timer(0.2, lambda: stack.enter_context(listener.accept()[0]))
        accepter.start()
        try:
            wire.connect(late, path, 10)
        finally:
            accepter.join(10)
        assert late.getpeername() == path


def cpu_seconds(pid: int) -> float:
    """User and system time the process has used (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_connection_flood_at_the_fd_limit(mount_factory) -> None:
    """With RLIMIT_NOFILE a few fds above what it uses, a flood of silent connections drives accept() into EMFILE:
    the server backs off (little CPU), and once the flood ends answers `vm list` at once."""
    mount = mount_factory("--scenario", "empty")
    pid = mount.process.pid
    limit = len(os.listdir(f"/proc/{pid}/fd")) + 8
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:{limit}"], check=True, timeout=10)
    flood: list[socket.socket] = []
    cpu_before = cpu_seconds(pid)
    try:
        while len(flood) < 1000:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(mount.control))
            except BlockingIOError:  # the backlog is full
                sock.close()
                break
            flood.append(sock)
        time.sleep(FLOOD_S)
        cpu = cpu_seconds(pid) - cpu_before
    finally:
        for sock in flood:
            sock.close()
    assert len(flood) > 8 and cpu < CPU_SHARE * FLOOD_S, (len(flood), cpu)
    assert "control socket: accept() failed (Too many open files); backing off\n" in mount.stderr()
    assert "Traceback" not in mount.stderr()
    start = time.monotonic()
    assert json.loads(mount.cli("vm", "list", "--json").stdout) == []
    assert time.monotonic() - start < READER_S


# -- clients that stop, clients that leave, a server that dies ------------------------------------

TWIN_SCENARIO = "seed = 5\n"
SMALL_VM = ("--memory", "256M", "--vcpus", "1")
BOOT = ("--set", "workers=0", "--set", "logins=1")


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Mount]]:
    """Two mounts of the same host seed: the same commands give byte-identical trees."""
    with (
        mount_with_scenario(tmp_path_factory, TWIN_SCENARIO) as first,
        mount_with_scenario(tmp_path_factory, TWIN_SCENARIO) as second,
    ):
        yield first, second


def vm_files(mount: Mount, name: str) -> dict[str, bytes]:
    """Every file of a VM's directory, read whole."""
    top = mount.path / name
    return {str(path.relative_to(top)): path.read_bytes() for path in sorted(top.rglob("*")) if path.is_file()}


def test_ctrl_c_detaches_and_the_workload_runs_to_its_end(twins: tuple[Mount, Mount]) -> None:
    """The same VM gets the same boot in two mounts; one client waits, the other gets SIGINT midway: one line,
    exit 130, and once both workloads are over (`clock advance` waits for them) the VMs are identical."""
    waited, interrupted = twins
    name = waited.create_vm(*SMALL_VM, "--seed", "7")
    assert interrupted.create_vm(*SMALL_VM, "--seed", "7") == name
    waiting = waited.spawn_cli("run", "idle", "--vm", name, "--set", "uptime=0", *BOOT)
    client = interrupted.spawn_cli("run", "idle", "--vm", name, "--set", "uptime=0", *BOOT)
    try:
        assert wait_until(lambda: workload_of(interrupted, name) == "idle", 20)
        client.send_signal(signal.SIGINT)
        out, err = client.communicate(timeout=10)
        assert workload_of(interrupted, name) == "idle"  # it goes on
        assert (client.returncode, out) == (130, "")
        assert err == f"kvmdbgfs: interrupted; idle goes on in VM {name} (`kvmdbgfs cancel --vm {name}` stops it)\n"
        out, err = waiting.communicate(timeout=120)
        assert (waiting.returncode, err) == (0, ""), err
    finally:
        for process in (waiting, client):
            process.kill()
            process.wait()
    for mount in twins:
        mount.cli("clock", "advance", "1s")
    listed = [next(vm for vm in request(mount.control, "vm.list") if vm["name"] == name) for mount in twins]
    assert listed[0] == listed[1] and listed[0]["booted"] and listed[0]["workload"] is None
    assert vm_files(waited, name) == vm_files(interrupted, name)
    assert "Traceback" not in interrupted.stderr(), interrupted.stderr()


def test_a_suspended_client_stalls_no_reader(twins: tuple[Mount, Mount]) -> None:
    """SIGSTOP a `kvmdbgfs run` for SUSPEND_S: the VM's files and `vm list` answer within READER_S meanwhile, the
    workload goes on, `kvmdbgfs cancel` stops it, and the client, continued, reports that. The workload is a
    build of 100000 files: minutes of emulation (an hour of idle takes less than SUSPEND_S to emulate)."""
    mount = twins[0]
    name = mount.create_vm(*SMALL_VM, "--seed", "9")
    mount.cli("run", "idle", "--vm", name, "--set", "uptime=0", *BOOT)  # kbuild needs a booted guest
    client = mount.spawn_cli("run", "kbuild", "--vm", name, "--set", "files=100000")
    try:
        assert wait_until(lambda: workload_of(mount, name) == "kbuild", 20)
        client.send_signal(signal.SIGSTOP)
        suspended = time.monotonic()
        listing = mount.cli_command("vm", "list", "--json")
        for command in (["cat", f"{name}/mmu_rmaps_stat"], ["cat", f"{name}/exits"], listing):
            start = time.monotonic()
            result = subprocess.run(command, cwd=mount.path, env=mount.env, capture_output=True, timeout=READER_S)
            assert result.returncode == 0 and time.monotonic() - start < READER_S, (command, result)
        assert {vm["name"]: vm["workload"] for vm in json.loads(result.stdout)}[name] == "kbuild"
        time.sleep(max(0.0, suspended + SUSPEND_S - time.monotonic()))
        assert client.poll() is None and workload_of(mount, name) == "kbuild"
        cancelled = mount.cli("cancel", "--vm", name)
        assert (cancelled.stdout, cancelled.stderr) == (f"cancelled kbuild on {name}\n", "")
        nothing = mount.cli("cancel", "--vm", name, check=False)
        assert_one_error_line(nothing, 1, f"{ERROR}no workload is running on VM {name}")
    finally:
        client.send_signal(signal.SIGCONT)
    out, err = client.communicate(timeout=60)
    assert (client.returncode, out) == (1, "") and err.startswith(ERROR) and err.count("\n") == 1, err
    assert "cancelled" in err and "Traceback" not in mount.stderr()


def test_remount_after_the_server_was_killed_with_readers_active(mount_factory, monkeypatch) -> None:
    """SIGKILL the server while readers loop over its files and one holds a file open: the next mount.py on that
    mountpoint detaches the dead mount, replaces the dead socket and the pointer, and serves."""
    killed = mount_factory("--scenario", "empty")
    name = killed.create_vm("--memory", "64M", "--vcpus", "1")
    stop = threading.Event()
    errors: set[int] = set()
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                (killed.path / name / "exits").read_bytes()
                reads[0] += 1
            except OSError as exc:
                errors.add(exc.errno or 0)
                time.sleep(0.01)

    held = os.open(killed.path / name / "exits", os.O_RDONLY)
    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        assert wait_until(lambda: reads[0] > 20, 10)
        killed.process.kill()
        killed.process.wait(10)
        assert wait_until(lambda: errno.ENOTCONN in errors, 10), errors
        with monkeypatch.context() as patch:
            # start_mount() makes the mountpoint with Path.mkdir(exist_ok=True), which stats it: ENOTCONN.
            patch.setattr(Path, "mkdir", lambda self, *args, **kwargs: None)
            reused = start_mount(killed.path.parent, "--scenario", "empty")
        try:
            assert f"server_pid: {reused.process.pid}\n" in reused.cli("status").stdout  # found from -m
            assert (reused.path / "exits").read_text() == "0\n"
            assert "detached a stale mount" in reused.stderr()
        finally:
            reused.stop()
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        with contextlib.suppress(OSError):
            os.close(held)
