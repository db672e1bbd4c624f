"""The record of a bench run, as JSON: the machine, the commit, every figure; and the comparison of a run with
an earlier record (``make bench BASELINE=file``)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from kvmdbgfs import native
from kvmdbgfs.bench.report import Figure, format_number

SCHEMA = 1
PACKAGES = ("kvmdbgfs", "mfusepy", "numpy", "tqdm")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class BenchResult:
    """One bench module's figures and notes."""

    name: str
    title: str
    figures: list[Figure]
    notes: list[str]


@dataclass
class RunRecord:
    """What one `make bench` run measured, and where."""

    machine: dict[str, Any]
    commit: dict[str, Any] | None
    started: str
    benches: list[BenchResult] = field(default_factory=list)
    seconds: float = 0.0

    def figures(self) -> dict[tuple[str, str], Figure]:
        """Every figure by (bench name, section / item)."""
        return {(bench.name, figure.key()): figure for bench in self.benches for figure in bench.figures}

    def missed(self) -> int:
        return sum(figure.passed is False for figure in self.figures().values())

    def as_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "started": self.started,
            "seconds": self.seconds,
            "machine": self.machine,
            "commit": self.commit,
            "missed": self.missed(),
            "benches": [
                {"name": b.name, "title": b.title, "notes": b.notes, "figures": [f.as_json() for f in b.figures]}
                for b in self.benches
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"bench record schema {data.get('schema')!r}, this bench reads {SCHEMA}")
        benches = [
            BenchResult(b["name"], b["title"], [Figure.from_json(f) for f in b["figures"]], b["notes"])
            for b in data["benches"]
        ]
        return cls(data["machine"], data["commit"], data["started"], benches, data.get("seconds", 0.0))


def write_record(record: RunRecord, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record.as_json(), indent=1) + "\n")


def read_record(path: Path) -> RunRecord:
    """An earlier run's record; ValueError with one line when it cannot be used."""
    try:
        return RunRecord.from_json(json.loads(path.read_text()))
    except OSError as exc:
        raise ValueError(f"baseline {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"baseline {path}: not a bench record ({exc})") from None


def machine_info() -> dict[str, Any]:
    """The CPU, the load, the Python, the package versions and the compiled build (kvmdbgfs/native.py) a run
    measured with."""
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average": list(os.getloadavg()),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "native": native.installed.name if native.installed else None,  # None: every module ran as Python
    }


def commit_info(repo: Path = REPO) -> dict[str, Any] | None:
    """HEAD's hash and whether the tree has changes, when ``repo`` is a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        return {"hash": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def new_record() -> RunRecord:
    return RunRecord(machine_info(), commit_info(), datetime.now(timezone.utc).isoformat(timespec="seconds"))


def default_path(record: RunRecord, directory: Path) -> Path:
    """bench-results/<UTC start>-<short commit>.json: runs never overwrite each other."""
    stamp = record.started.replace(":", "").replace("+0000", "Z")
    commit = (record.commit or {}).get("hash", "nocommit")[:10]
    return directory / f"{stamp}-{commit}.json"


def change_text(old: float | None, new: float | None) -> str:
    if old is None or new is None:
        return f"{'-' if old is None else format_number(old)} -> {'-' if new is None else format_number(new)}"
    change = f" ({(new - old) / old:+.0%})" if old else ""
    return f"{format_number(old)} -> {format_number(new)}{change}"


def compare(baseline: RunRecord, current: RunRecord) -> list[str]:
    """One line per figure of ``current``: its value's (and ratio's) change since ``baseline``, and a verdict
    that changed; then the baseline's figures this run no longer has (of the benches it ran)."""
    old_figures, lines = baseline.figures(), []
    for key, figure in current.figures().items():
        name = f"{key[0]}: {key[1]}"
        old = old_figures.get(key)
        if old is None:
            lines.append(f"{name}: new figure, {figure.measured_text()}")
            continue
        if old.unit != figure.unit:
            lines.append(f"{name}: unit changed from {old.unit} to {figure.unit}, not compared")
            continue
        text = f"{name}: {change_text(old.value, figure.value)} {figure.unit}"
        if old.ratio is not None or figure.ratio is not None:
            text += f"; ratio {change_text(old.ratio, figure.ratio)}"
        if old.passed != figure.passed:
            text += f"; {old.verdict or 'no target'} -> {figure.verdict or 'no target'}"
        lines.append(text)
    current_keys, ran = current.figures(), {bench.name for bench in current.benches}
    lines += [f"{key[0]}: {key[1]}: gone (was {old.measured_text()})"
              for key, old in old_figures.items() if key not in current_keys and key[0] in ran]
    return lines
