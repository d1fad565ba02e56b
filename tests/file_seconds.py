"""Writes tests/file_seconds.json from pytest JUnit XML reports.

  python -m pytest -q --junitxml=/tmp/fast.xml
  make test PYTEST_ARGS="-m slow --junitxml=/tmp/slow.xml"
  python tests/file_seconds.py /tmp/fast.xml /tmp/slow.xml

The JSON maps each test file to the seconds of each of its tests in those
reports; a refresh replaces the entries of the tests the reports ran and
keeps the others (a `-m slow` report leaves the fast tests' seconds). A
file's weight in a run is the sum over the tests that run selects, so
`make test` and `.ci/run`'s slow stage (where the recipe chains are the
longest file though `make test` runs none of their tests) each order their
own files. conftest.py orders the collected files by it, longest first,
and pytest's options turn xdist's own reordering off, so that `--dist
loadfile` hands the two workers the long files first and the short ones
fill the end (longest-first is within 0.1% of an even split of this suite;
xdist's default order, by number of tests, left one worker idle for 1 to 2
minutes).
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Mapping

OUTPUT = pathlib.Path(__file__).with_name("file_seconds.json")

Seconds = dict[str, dict[str, float]]


def test_seconds(report: str) -> Seconds:
    """{test file name: {test name: seconds}} of the cases in `report`
    (each to 0.1 s); skipped cases are left out (their ~0 s would replace
    what they take where they run)."""
    seconds: Seconds = collections.defaultdict(dict)
    for case in ElementTree.parse(report).iter("testcase"):
        if case.find("skipped") is not None:
            continue
        module = case.get("classname", "").split(".")[-1]
        seconds[f"{module}.py"][case.get("name", "")] = round(
            float(case.get("time", 0.0)), 1
        )
    return dict(seconds)


def merged(old: Seconds, reports: Iterable[Seconds]) -> Seconds:
    """`old` with each report's tests' seconds put in (later reports win),
    files and tests sorted by name."""
    result = {name: dict(tests) for name, tests in old.items()}
    for report in reports:
        for name, tests in report.items():
            result.setdefault(name, {}).update(tests)
    return {name: dict(sorted(result[name].items())) for name in sorted(result)}


def file_weights(
    selected: Iterable[tuple[str, str]], seconds: Mapping[str, Mapping]
) -> dict[str, float]:
    """{file: summed seconds of its selected tests} for (file, test name)
    pairs; a file none of whose selected tests was measured weighs
    infinity (a new file runs first until measured)."""
    weights: dict[str, float] = collections.defaultdict(float)
    measured: set[str] = set()
    for name, test in selected:
        known = seconds.get(name, {})
        weights[name] += known.get(test, 0.0)
        if test in known:
            measured.add(name)
    return {
        name: weight if name in measured else math.inf
        for name, weight in weights.items()
    }


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python tests/file_seconds.py <junit xml>...")
    old = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {}
    new = merged(old, (test_seconds(path) for path in sys.argv[1:]))
    OUTPUT.write_text(json.dumps(new, indent=1) + "\n")
    print(f"wrote {OUTPUT}")
