"""`kvmdbgfs snapshot`: a running mount's tree, or a scenario's built in-process (no FUSE needed), written as plain
files and/or one text archive (format: kvmdbgfs/snapshot.py).

    kvmdbgfs snapshot MOUNTPOINT [DIR] [--archive FILE]        (or kvmdbgfs -m MOUNTPOINT snapshot ...)
    kvmdbgfs snapshot --scenario NAME|FILE [--kernel PROFILE] [DIR] [--archive FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kvmdbgfs.control.client import RequestError
from kvmdbgfs.kvm.profiles import DEFAULT_PROFILE
from kvmdbgfs.snapshot import Snapshot, format_archive, scenario_host, take_snapshot, write_directory


def add_parser(commands: Any) -> None:
    """The `snapshot` subcommand of the `kvmdbgfs` command."""
    parser = commands.add_parser("snapshot", help="write a mount's or a scenario's tree as files or an archive")
    parser.add_argument("paths", nargs="*", metavar="[MOUNTPOINT] [DIR]", help="the mount to read; where to write")
    parser.add_argument("--scenario", help="build this scenario in-process (manual clock) instead of reading a mount")
    parser.add_argument("--kernel", default=DEFAULT_PROFILE, help=f"with --scenario: the profile ({DEFAULT_PROFILE})")
    parser.add_argument("--archive", metavar="FILE", help="write one text archive to FILE ('-': standard output)")


def _source_and_directory(args: argparse.Namespace) -> tuple[str | None, Path | None]:
    """The mountpoint to read (None: build --scenario) and the directory to write (None: archive only)."""
    paths = list(args.paths)
    if args.scenario is not None:
        if len(paths) > 1:
            raise RequestError("with --scenario give at most one path: the directory to write")
        mount = None
    elif len(paths) == 2:
        mount = paths.pop(0)
    elif args.mount:
        mount = args.mount
    elif len(paths) == 1 and args.archive:
        mount = paths.pop()
    else:
        raise RequestError("give a mountpoint (or --scenario) and a directory to write, or --archive FILE")
    if len(paths) > 1:
        raise RequestError("too many paths: give [MOUNTPOINT] [DIR]")
    directory = Path(paths[0]) if paths else None
    if directory is None and args.archive is None:
        raise RequestError("nothing to write: give a directory or --archive FILE")
    return mount, directory


def scenario_snapshot(scenario: str, kernel: str) -> Snapshot:
    """Build the scenario's host in this process under a manual clock, read its tree, shut it down."""
    vmm = scenario_host(scenario, kernel)
    try:
        return take_snapshot(vmm)
    finally:
        vmm.shutdown()


def run_snapshot(args: argparse.Namespace, call: Any) -> Snapshot:
    """Take the snapshot the arguments ask for and write it; ``call`` sends a control request to the mount."""
    mount, directory = _source_and_directory(args)
    try:
        if mount is None:
            snapshot = scenario_snapshot(args.scenario, args.kernel)
        else:
            args.mount = mount
            snapshot = Snapshot.from_wire(call(args, "snapshot"))
        if directory is not None:
            write_directory(snapshot, directory)
        if args.archive == "-":
            sys.stdout.buffer.write(format_archive(snapshot))
            sys.stdout.flush()
        elif args.archive is not None:
            Path(args.archive).write_bytes(format_archive(snapshot))
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    except OSError as exc:
        raise RequestError(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)) from None
    return snapshot
