"""The `kvmdbgfs` command: drive a running mount through its control socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from kvmdbgfs import nsexec, snapshot_command
from kvmdbgfs.arg_types import seconds
from kvmdbgfs.control.client import DEFAULT_TIMEOUT_S, ProgressCallback, RequestError, request
from kvmdbgfs.control.paths import UnsafeRuntimeDir, find_socket
from kvmdbgfs.daemon import STOP_TIMEOUT_S, ServerFailed, unmount
from kvmdbgfs.from_host import profile_from_host
from kvmdbgfs.kvm.host import parse_int
from kvmdbgfs.kvm.profile_file import ProfileError, dumps, save_profile_file
from kvmdbgfs.kvm.vm import MMU_MODES
from kvmdbgfs.progress import progress_bar
from kvmdbgfs.vmm.bootcache import BootCache, default_directory
from kvmdbgfs.workloads.base import parse_assignments

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128 + 2  # the shell's status for a command ended by SIGINT


def integer(text: str) -> int:
    """An argparse type (its name is in the error): a whole number in ASCII digits."""
    return parse_int(text)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"kvmdbgfs: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvmdbgfs", description="Drive a running kvmdbgfs mount.")
    parser.add_argument(
        "-m",
        "--mount",
        default=os.environ.get("KVMDBGFS_MOUNT"),
        help="the mountpoint of a running `kvmdbgfs mount` (default: $KVMDBGFS_MOUNT)",
    )
    parser.add_argument("--control", type=Path, help="talk to this control socket instead of finding it from -m")
    parser.add_argument(
        "--timeout",
        type=seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"give up when the server sends nothing for this long (default {DEFAULT_TIMEOUT_S:g}; a workload goes on)",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    vm = commands.add_parser("vm", help="create, destroy and list VMs").add_subparsers(
        dest="vm_command", required=True, parser_class=_Parser
    )
    create = vm.add_parser("create", help="create a VM; prints its directory name")
    create.add_argument("--memory", default="6G", help="guest RAM, e.g. 6G or 512M (default 6G)")
    create.add_argument("--vcpus", type=integer, default=2, help="number of vCPUs (default 2)")
    create.add_argument("--mmu", choices=MMU_MODES, default="shadow", help="MMU mode (default shadow)")
    create.add_argument("--kernel", help="kernel profile (default: the mount's)")
    create.add_argument("--seed", type=integer, help="seed for everything random in this VM")
    create.add_argument("--rmap-design", choices=("A", "B", "C", "D"), help="rmap list design (default: the kernel's)")
    destroy = vm.add_parser("destroy", help="destroy a VM (its directory stays while files are open)")
    destroy.add_argument("name", help="the VM's directory name, <pid>-<fd>")
    listing = vm.add_parser("list", help="list VMs")
    listing.add_argument("--json", action="store_true", help="print JSON")
    status = commands.add_parser("status", help="show the mount's state")
    status.add_argument(
        "--wait-booted", type=seconds, metavar="SECONDS",
        help="first wait, at most SECONDS, until the scenario's guests have booted (exit 1 if they have not)",
    )
    run = commands.add_parser("run", help="run a workload on a VM")
    run.add_argument("workload", help="idle, rmap_fork, kbuild, memhog or hotplug (see `workloads`)")
    run.add_argument("--vm", required=True, help="the VM's directory name, <pid>-<fd>")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a workload parameter")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument("--detach", action="store_true", help="return at once; the workload runs on (see vm list)")
    cancel = commands.add_parser("cancel", help="stop the workload running on a VM (what it started is torn down)")
    cancel.add_argument("--vm", required=True, help="the VM's directory name, <pid>-<fd>")
    clock = commands.add_parser("clock", help="the host clock").add_subparsers(
        dest="clock_command", required=True, parser_class=_Parser
    )
    advance = clock.add_parser("advance", help="move a manual clock forward and wait until the guests got there")
    advance.add_argument("duration", help="how far: 500ms, 10s, 2m")
    commands.add_parser("workloads", help="list workloads and their parameters")
    profile = commands.add_parser("profile", help="write a kernel profile file that `--kernel FILE` takes")
    profile.add_argument("--from-host", action="store_true", required=True, help="read it from this machine's KVM")
    profile.add_argument("--device", default="/dev/kvm", help="the KVM device (default /dev/kvm)")
    profile.add_argument("out", nargs="?", type=Path, help="the file to write (default: standard output)")
    commands.add_parser("mount", help="mount a tree and serve it (`kvmdbgfs mount --help`)", add_help=False)
    cache = commands.add_parser("cache", help="the boot cache (no server needed)").add_subparsers(
        dest="cache_command", required=True, parser_class=_Parser
    )
    cache.add_parser("clear", help="remove every boot snapshot from the cache")
    umount = commands.add_parser("umount", help="unmount a tree and wait until its server has exited")
    umount.add_argument("mountpoint", help="where the tree is mounted")
    umount.add_argument(
        "--wait", type=seconds, default=STOP_TIMEOUT_S, metavar="SECONDS", help="how long to wait for the server"
    )
    snapshot_command.add_parser(commands)
    commands.add_parser(
        "exec", help="run a command with the tree at /sys/kernel/debug/kvm (`kvmdbgfs exec --help`)", add_help=False
    )
    return parser


def _socket(args: argparse.Namespace) -> Path:
    if args.control is not None:
        return args.control
    if not args.mount:
        raise RequestError("no mount given: use -m MOUNTPOINT (or set KVMDBGFS_MOUNT)")
    if not os.path.isdir(args.mount):
        raise RequestError(f"{args.mount}: not a directory")
    try:
        return find_socket(args.mount)
    except UnsafeRuntimeDir as exc:
        raise RequestError(str(exc)) from None
    except OSError as exc:
        raise RequestError(f"{exc.filename}: {exc.strerror}") from None


def _call(args: argparse.Namespace, cmd: str, on_progress: ProgressCallback | None = None, **kwargs: Any) -> Any:
    path = _socket(args)
    try:
        return request(path, cmd, on_progress, timeout=args.timeout, **kwargs)
    except (FileNotFoundError, ConnectionRefusedError):
        raise RequestError(f"no kvmdbgfs server is listening for {args.mount or path}") from None
    except TimeoutError:
        goes_on = "; the workload goes on" if cmd == "workload.run" else ""
        raise RequestError(f"the server at {path} sent nothing for {args.timeout:g} s (--timeout){goes_on}") from None
    except OSError as exc:
        raise RequestError(f"{path}: {exc.strerror or exc}") from None


def _print_vm_table(vms: list[dict[str, Any]]) -> None:
    print(f"{'NAME':<14}{'MEMORY':>8} {'VCPUS':>5} {'MMU':<11}{'KERNEL':<12}{'RMAP':<5}{'USERS':>5}  STATE")
    for vm in vms:
        state = "destroyed (pinned by open files)" if vm["destroyed"] else f"up {vm['uptime_s']:.1f}s"
        if vm["workload"]:
            state += f", running {vm['workload']}"
        memory = f"{vm['memory'] >> 20}M" if vm["memory"] % (1 << 30) else f"{vm['memory'] >> 30}G"
        print(
            f"{vm['name']:<14}{memory:>8} {vm['vcpus']:>5} {vm['mmu']:<11}{vm['kernel']:<12}"
            f"{vm['rmap_design']:<5}{vm['users_count']:>5}  {state}"
        )


def _run_workload(args: argparse.Namespace) -> dict[str, Any]:
    try:
        settings = parse_assignments(args.set)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    if args.detach:
        return _call(args, "workload.run", vm=args.vm, workload=args.workload, settings=settings, detach=True)
    with progress_bar(f"{args.vm} {args.workload}") as progress:
        return _call(args, "workload.run", on_progress=progress, vm=args.vm, workload=args.workload, settings=settings)


def _print_workloads(workloads: list[dict[str, Any]]) -> None:
    for workload in workloads:
        print(f"{workload['name']}: {workload['description']}")
        for param in workload["params"]:
            print(f"  {param['name']}={param['default']}  ({param['min']}..{param['max']}) {param['help']}")


def _write_host_profile(args: argparse.Namespace) -> int:
    """`kvmdbgfs profile --from-host [OUT]`: no server involved; one line and status 1 when KVM cannot be read."""
    try:
        profile = profile_from_host(args.device)
        if args.out is None:
            sys.stdout.write(dumps(profile))
        else:
            save_profile_file(profile, args.out)
    except ProfileError as exc:
        raise RequestError(str(exc)) from None
    if args.out is not None:
        print(f"{args.out}: profile {profile.name} (rules of {profile.rules})", file=sys.stderr)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    if args.command == "cache":
        directory = default_directory()
        try:
            removed = BootCache(directory).clear()
        except OSError as exc:
            raise RequestError(f"{directory}: {exc.strerror}") from None
        print(f"removed {removed} boot snapshot{'s' if removed != 1 else ''} from {directory}")
        return EXIT_OK
    if args.command == "umount":
        try:
            print(unmount(args.mountpoint, args.wait))
        except ServerFailed as exc:
            raise RequestError(str(exc)) from None
        return EXIT_OK
    if args.command == "snapshot":
        snapshot = snapshot_command.run_snapshot(args, _call)
        header = snapshot.header
        print(f"{header['entries']} entries at host time {header['host_time_ns']} ns", file=sys.stderr)
        return EXIT_OK
    if args.command == "profile":
        return _write_host_profile(args)
    if args.command == "run":
        summary = _run_workload(args)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            for key, value in summary.items():
                print(f"{key}: {value}")
        return EXIT_OK
    if args.command == "cancel":
        cancelled = _call(args, "workload.cancel", vm=args.vm)
        print(f"cancelled {cancelled['workload']} on {cancelled['vm']}")
        return EXIT_OK
    if args.command == "workloads":
        _print_workloads(_call(args, "workload.list"))
        return EXIT_OK
    if args.command == "clock":
        print(_call(args, "clock.advance", duration=args.duration)["host_time_ns"])
        return EXIT_OK
    if args.command == "status":
        if args.wait_booted is None:
            status = _call(args, "status")
        else:
            status = _call(args, "boot.wait", seconds=args.wait_booted)
            if not status["booted"]:
                raise RequestError(f"the scenario's guests have not booted within {args.wait_booted:g} s")
        for key, value in status.items():
            print(f"{key}: {value}")
    elif args.vm_command == "create":
        vm = _call(
            args,
            "vm.create",
            memory=args.memory,
            vcpus=args.vcpus,
            mmu=args.mmu,
            kernel=args.kernel,
            seed=args.seed,
            rmap_design=args.rmap_design,
        )
        print(vm["name"])
    elif args.vm_command == "destroy":
        _call(args, "vm.destroy", name=args.name)
    elif args.vm_command == "list":
        vms = _call(args, "vm.list")
        if args.json:
            print(json.dumps(vms, indent=2))
        else:
            _print_vm_table(vms)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mount"]:  # the server's own options, not the client's
        from kvmdbgfs import mount_command  # loads libfuse: only where a tree is mounted (snapshots need none)

        return mount_command.main(argv[1:], prog="kvmdbgfs mount")
    if argv[:1] == ["exec"]:
        return nsexec.exec_fresh(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except RequestError as exc:
        print(f"kvmdbgfs: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"kvmdbgfs: interrupted{_what_goes_on(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _what_goes_on(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves running: the server carries on with a request it got; `run` detaches from its workload."""
    if args.command != "run":
        return ""
    return f"; {args.workload} goes on in VM {args.vm} (`kvmdbgfs cancel --vm {args.vm}` stops it)"


if __name__ == "__main__":
    sys.exit(main())
