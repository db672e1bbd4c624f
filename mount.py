#!/usr/bin/env python3
"""The checkout's entry point for `kvmdbgfs mount` (see kvmdbgfs/mount_command.py)."""

import sys

from kvmdbgfs.mount_command import main

if __name__ == "__main__":
    sys.exit(main())
