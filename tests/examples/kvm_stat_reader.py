"""A kvm_stat-style reader, written the way tools that read KVM debugfs are, with the paths hard-coded as
theirs are: debugfs is the first mount in /proc/mounts whose type is ``debugfs``; the field list is the
top-level files of its ``kvm`` directory; the values are summed over every VM directory, or over the VM of
one QEMU process (``-p PID``, or ``-g GUEST``: the process whose command line has ``-name guest=GUEST``), as
kvm_stat -d does. A baseline is read at start; each line on stdin then prints every field's total since the
baseline and its delta since the last refresh (kvm_stat refreshes on a key), then ``--``.

Run it under `kvmdbgfs exec` to read the emulated tree: `kvmdbgfs exec -- python kvm_stat_reader.py -g vm0`.
"""

from __future__ import annotations

import argparse
import os
import sys


def debugfs_kvm_dir() -> str:
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split(" ")
            if fields[2] == "debugfs":
                return os.path.join(fields[1], "kvm")
    sys.exit("debugfs is not mounted")


def guest_pid(guest: str) -> int:
    """The pid of the process whose command line has ``-name guest=GUEST,...`` (or ``-name GUEST``)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                args = handle.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "-name" in args[:-1]:
            options = args[args.index("-name") + 1].split(",")
            names = [option[len("guest=") :] for option in options if option.startswith("guest=")]
            if guest in names or options[0] == guest:
                return int(entry)
    sys.exit(f"no guest named {guest!r}")


def read_values(root: str, vms: list[str], fields: list[str]) -> dict[str, int]:
    values = dict.fromkeys(fields, 0)
    for vm in vms:
        for field in fields:
            try:
                with open(os.path.join(root, vm, field)) as handle:
                    values[field] += int(handle.read())
            except OSError:  # the VM went away meanwhile
                pass
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("-p", "--pid", type=int, help="only the VM of this QEMU process")
    chosen.add_argument("-g", "--guest", help="only the VM of the QEMU process running this guest")
    args = parser.parse_args()
    root = debugfs_kvm_dir()
    pid = guest_pid(args.guest) if args.guest else args.pid
    if pid is not None and not os.path.isdir(f"/proc/{pid}"):
        sys.exit(f"no process {pid}")
    _, dirs, files = next(os.walk(root))
    fields = sorted(files)
    vms = sorted(name for name in dirs if pid is None or name.startswith(f"{pid}-"))
    print(f"# {len(fields)} fields from {root}, VMs: {' '.join(vms)}", flush=True)
    baseline = previous = read_values(root, vms, fields)
    for _line in sys.stdin:
        values = read_values(root, vms, fields)
        for field in fields:
            print(f"{field:<42} {values[field] - baseline[field]:>10} {values[field] - previous[field]:>10}")
        print("--", flush=True)
        previous = values
    return 0


if __name__ == "__main__":
    sys.exit(main())
