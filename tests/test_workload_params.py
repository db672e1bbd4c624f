"""Workload parameters: parsing, ranges and unknown names are refused before anything runs."""

from __future__ import annotations

import pytest

from kvmdbgfs.workloads.base import Param, Workload, parse_assignments

CHILDREN = Param("children", 500, 10, 1000, "children to fork")
AREA = Param("area", 1 << 20, 4096, 1 << 30, "shared area size", size=True)


class Example(Workload):
    name = "example"
    description = "for tests"
    params = (CHILDREN, AREA)

    def run(self, kvm, settings, rng, progress):  # pragma: no cover - never run
        raise AssertionError


@pytest.mark.parametrize(("param", "text", "value"), [(CHILDREN, "10", 10), (CHILDREN, 1000, 1000), (AREA, "1M", 1 << 20), (AREA, "64K", 65536)])
def test_param_parse(param: Param, text, value: int) -> None:
    assert param.parse(text) == value


@pytest.mark.parametrize(
    ("param", "text", "message"),
    [
        (CHILDREN, "9", "children must be between 10 and 1000, not 9"),
        (CHILDREN, "1001", "children must be between 10 and 1000, not 1001"),
        (CHILDREN, "many", "children: not a whole number: 'many'"),
        (CHILDREN, True, "children: not a whole number: True"),
        (CHILDREN, 20.0, "children: not a whole number: 20.0"),  # a scenario's float
        (CHILDREN, "1_000", "children: not a whole number: '1_000'"),  # int() would take it; ASCII digits only
        (CHILDREN, "\u0662\u0660", "children: not a whole number: '\u0662\u0660'"),  # Arabic-Indic 20
        (CHILDREN, " 20", "children: not a whole number: ' 20'"),
        (AREA, "1_0M", "area: not a size: '1_0M'"),
        (AREA, "1Q", "area: not a size: '1Q'"),
        (AREA, "1K", "area must be between 4096 and 1073741824, not 1024"),
    ],
)
def test_param_refusals(param: Param, text, message: str) -> None:
    with pytest.raises(ValueError) as info:
        param.parse(text)
    assert str(info.value) == message


def test_settings_fill_defaults_and_refuse_unknown_names() -> None:
    workload = Example()
    assert workload.settings({}) == {"children": 500, "area": 1 << 20}
    assert workload.settings({"children": "20"}) == {"children": 20, "area": 1 << 20}
    with pytest.raises(ValueError, match="example: unknown parameter 'kids' \\(parameters: children, area\\)"):
        workload.settings({"kids": "3"})


def test_parse_assignments() -> None:
    assert parse_assignments(["children=20", "area=2M"]) == {"children": "20", "area": "2M"}
    for bad in ("children", "=3"):
        with pytest.raises(ValueError, match="--set takes key=value"):
            parse_assignments([bad])
