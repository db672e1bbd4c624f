# kvmdbgfs: `make run` mounts the emulated KVM debugfs tree at ./mnt, `make test` runs the tests.
# Both set up what they need: a virtualenv with the project, and the FUSE system package.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MNT ?= mnt
SCENARIO ?= default
KERNEL ?= latest
PYTEST_ARGS ?=
# make bench [BENCHES="reads startup"] [BASELINE=bench-results/earlier.json]
BENCHES ?=
BASELINE ?=
# NATIVE=0: make setup leaves the hot modules uncompiled (see native: below)
NATIVE ?= 1

.PHONY: run test bench clean setup fuse bytecode native test-tools

run: setup
	@mkdir -p $(MNT)
	$(PY) mount.py $(MNT) --scenario $(SCENARIO) --kernel $(KERNEL)

test: setup test-tools
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m kvmdbgfs.bench $(BENCHES) $(if $(BASELINE),--baseline $(BASELINE))

setup: fuse $(STAMP) bytecode $(if $(filter 1,$(NATIVE)),native)

# The project's bytecode, as pip writes it for an installed package. An editable install has none until an
# import writes it, which never happens where PYTHONDONTWRITEBYTECODE is set (as on this project's machines):
# every start of mount.py would compile each module again (0.1 s of a 0.3 s start). Only changed sources are
# compiled (0.04 s when none changed).
bytecode: $(STAMP)
	@$(PY) -m compileall -q kvmdbgfs workloads mount.py >/dev/null

# The MMU and guest modules compiled by mypyc (kvmdbgfs/native.py) into kvmdbgfs/_native/, under a digest of every
# source of the package: about 100 s when any source changed since the last build, 0.1 s when none did. An import
# uses a build only while its digest is the sources' (an edit makes every module Python until the next build).
# The C compiler and Python's headers are installed with apt where missing; without them, every module runs as
# Python (slower, the same results) and native_build says so.
native: $(STAMP)
	@for package in $$($(PY) -m kvmdbgfs.native_build --missing-packages); do \
		$(MAKE) --no-print-directory apt-$$package || true; \
	done
	@$(PY) -m kvmdbgfs.native_build

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || $(MAKE) --no-print-directory apt-python3-venv
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# The FUSE system package: installed with apt when missing and running as root, else named.
fuse:
	@if ! command -v fusermount3 >/dev/null 2>&1 && ! command -v fusermount >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory apt-fuse3; \
	fi
	@[ -e /dev/fuse ] || { echo "make: /dev/fuse is missing: load the fuse kernel module (modprobe fuse)" >&2; exit 1; }

# rsync, which tests/test_fuse_files.py copies with (tar and cp come with the system).
# rsync for the copying-tools test (it skips without it): installed where apt can, never a reason to fail.
test-tools:
	@command -v rsync >/dev/null 2>&1 || $(MAKE) --no-print-directory apt-rsync || true

apt-%:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make: installing the Debian package $*"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $* >/dev/null; \
	else \
		echo "make: the Debian package '$*' is missing: install it with 'sudo apt-get install $*'" >&2; exit 1; \
	fi

clean:
	@if grep -qs " $$(realpath $(MNT) 2>/dev/null) " /proc/self/mountinfo; then \
		echo "make: $(MNT) is mounted: stop mount.py first" >&2; exit 1; fi
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis $(MNT) kvmdbgfs/_native
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
