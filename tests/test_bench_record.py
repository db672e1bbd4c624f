"""The bench's figures, its JSON record and the comparison with an earlier record (no timing here: the
benchmarks themselves run only in `make bench`)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest

from kvmdbgfs import native
from kvmdbgfs.bench import __main__ as bench_main
from kvmdbgfs.bench.record import BenchResult, RunRecord, compare, new_record, read_record, write_record
from kvmdbgfs.bench.report import Figure, Target, at_least, at_most, format_table

REPO = Path(__file__).resolve().parents[1]


def reads_figure(rate: float, bare: float) -> Figure:
    return Figure("reads/s", "exits", rate, "reads/s", "median of 5", bare, "bare", at_least(0.8))


def run_record(*figures: Figure) -> RunRecord:
    record = RunRecord({"cpu_count": 2}, {"hash": "abc", "dirty": False}, "2026-01-01T00:00:00+00:00")
    record.benches.append(BenchResult("reads", "the read path", list(figures), ["a note"]))
    return record


def test_a_ratio_target_judges_value_over_peer():
    assert reads_figure(900, 1000).ratio == pytest.approx(0.9)
    assert reads_figure(900, 1000).passed is True
    assert reads_figure(700, 1000).passed is False


def test_an_absolute_target_judges_the_value_and_says_so():
    boot = Figure("start-up", "cold boot", 4.0, "s", "median of 2", target=at_most(5.0, absolute=True))
    assert boot.passed is True
    assert replace_value(boot, 6.0).passed is False
    assert boot.target_text() == "<= 5 s (absolute)"
    assert reads_figure(1, 1).target_text() == "ratio >= 0.8x"


def replace_value(figure: Figure, value: float | None) -> Figure:
    return Figure(**{**figure.__dict__, "value": value})


def test_tolerance_target_and_unmeasured_figures():
    per_head = Figure("memory", "per head", 8.5, "B", "exact", target=Target("+-", 8, absolute=True, tolerance=0.1))
    assert per_head.passed is True
    assert replace_value(per_head, 9.0).passed is False
    missing = replace_value(reads_figure(1, 1), None)
    assert missing.passed is False and missing.ratio is None and missing.measured_text() == "not measured"
    assert Figure("x", "info", 3.0, "ms").passed is None


def test_bad_target_operator():
    with pytest.raises(ValueError, match="operator"):
        Target("<", 1.0)


def test_table_shows_how_target_and_verdict():
    table = format_table("the read path", [reads_figure(700, 1000)], ["a note"])
    assert "median of 5" in table and "ratio >= 0.8x" in table and "FAIL" in table and "note: a note" in table
    assert "700 reads/s vs 1000 reads/s bare = 0.7x" in table


def test_record_round_trips_through_json(tmp_path):
    record = run_record(reads_figure(900, 1000), Figure("memory", "per head", 8.0, "B", "exact",
                                                        target=Target("+-", 8, True, 0.1), reference="kernel 8 B"))
    path = tmp_path / "out" / "run.json"
    write_record(record, path)
    data = json.loads(path.read_text())
    assert data["missed"] == 0 and data["commit"]["hash"] == "abc"
    figure = data["benches"][0]["figures"][0]
    assert (figure["unit"], figure["ratio"], figure["passed"]) == ("reads/s", 0.9, True)
    assert figure["method"] == "median of 5"
    assert figure["target"] == {"op": ">=", "bound": 0.8, "absolute": False, "tolerance": 0.0}
    assert read_record(path).figures() == record.figures()


def test_numpy_figures_are_written_as_json_numbers(tmp_path):
    record = run_record(reads_figure(np.float64(900), np.float64(1000)),
                        Figure("x", "y", np.float64(1), "ms", target=at_most(2, absolute=True)))
    write_record(record, tmp_path / "run.json")
    figures = json.loads((tmp_path / "run.json").read_text())["benches"][0]["figures"]
    assert [(f["value"], f["passed"]) for f in figures] == [(900.0, True), (1.0, True)]


def test_compare_prints_each_change_new_and_gone():
    old = run_record(reads_figure(1000, 1000), Figure("x", "dropped", 1.0, "ms"))
    new = run_record(reads_figure(700, 1000), Figure("x", "added", 2.0, "ms"))
    assert compare(old, new) == [
        "reads: reads/s / exits: 1000 -> 700 (-30%) reads/s; ratio 1.00 -> 0.7 (-30%); pass -> FAIL",
        "reads: x / added: new figure, 2.00 ms",
        "reads: x / dropped: gone (was 1.00 ms)",
    ]


def test_compare_leaves_out_the_benches_not_run():
    old = run_record(reads_figure(1000, 1000))
    old.benches.append(BenchResult("startup", "start-up", [Figure("s", "served", 1.0, "s")], []))
    assert compare(old, run_record(reads_figure(1000, 1000))) == [
        "reads: reads/s / exits: 1000 -> 1000 (+0%) reads/s; ratio 1.00 -> 1.00 (+0%)"
    ]


def test_compare_refuses_a_changed_unit():
    old = run_record(Figure("x", "y", 1.0, "ms"))
    lines = compare(old, run_record(Figure("x", "y", 1.0, "s")))
    assert lines == ["reads: x / y: unit changed from ms to s, not compared"]


@pytest.mark.parametrize("text", ["not json", json.dumps({"schema": 99}), json.dumps({"schema": 1})])
def test_a_bad_baseline_is_one_line_and_exit_2(tmp_path, capsys, text):
    path = tmp_path / "baseline.json"
    path.write_text(text)
    assert bench_main.main(["--baseline", str(path), "rmap"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench: ") and err.count("\n") == 1


def test_missing_baseline_and_unknown_bench(tmp_path, capsys):
    assert bench_main.main(["--baseline", str(tmp_path / "none.json")]) == 2
    assert "No such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench_main.main(["nosuchbench"])
    assert exit_info.value.code == 2


def test_machine_and_commit_of_a_new_record():
    record = new_record()
    assert record.machine["cpu_count"] >= 1 and len(record.machine["load_average"]) == 3
    assert set(record.machine["packages"]) >= {"kvmdbgfs", "mfusepy", "numpy"}
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert record.commit is not None and record.commit["hash"] == head.stdout.strip()
    assert sys.version.split()[0] in record.machine["python"]
    # The compiled build in use, if any: figures from the two modes are not comparable.
    assert record.machine["native"] == (native.installed.name if native.installed else None)
    expected = f"modules compiled ({native.installed.name})" if native.installed else "modules Python"
    assert expected in bench_main.machine_line(record)


def test_main_writes_the_record_then_compares_with_it(tmp_path, monkeypatch, capsys):
    rate = {"value": 900.0}
    fake = SimpleNamespace(TITLE="a fake bench", run=lambda: ([reads_figure(rate["value"], 1000)], ["its note"]))
    monkeypatch.setattr(bench_main, "BENCHES", {"fake": fake})
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    assert bench_main.main(["--json", str(first)]) == 0
    out = capsys.readouterr().out
    assert "a fake bench" in out and "all targets met" in out and str(first) in out
    rate["value"] = 450.0
    assert bench_main.main(["--json", str(second), "--baseline", str(first)]) == 1
    out = capsys.readouterr().out
    assert f"Changes since {first}" in out
    assert "fake: reads/s / exits: 900 -> 450 (-50%) reads/s; ratio 0.9 -> 0.45 (-50%); pass -> FAIL" in out
    assert "1 target(s) missed" in out
    assert read_record(second).missed() == 1
