"""`python -m kvmdbgfs`: the same as the installed `kvmdbgfs` command."""

import sys

from kvmdbgfs.cli import main

sys.exit(main())
