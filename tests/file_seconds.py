"""Writes tests/file_seconds.json from a pytest JUnit XML report.

  python -m pytest -q --junitxml=/tmp/run.xml
  python tests/file_seconds.py /tmp/run.xml

The JSON maps each test file to the seconds its tests took in that run.
conftest.py orders the collected files by it, longest first, and pytest's
options turn xdist's own reordering off, so that `--dist loadfile` hands
the two workers the long files first and the short ones fill the end
(longest-first is within 0.1% of an even split of this suite; xdist's
default order, by number of tests, left one worker idle for 1 to 2
minutes).
"""

from __future__ import annotations

import collections
import json
import pathlib
import sys
import xml.etree.ElementTree as ElementTree

OUTPUT = pathlib.Path(__file__).with_name("file_seconds.json")


def file_seconds(report: str) -> dict[str, float]:
    """{test file name: summed seconds of its test cases} in `report`."""
    seconds: dict[str, float] = collections.Counter()
    for case in ElementTree.parse(report).iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        seconds[f"{module}.py"] += float(case.get("time", 0.0))
    return {name: round(value, 1) for name, value in sorted(seconds.items())}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/file_seconds.py <pytest junit xml>")
    OUTPUT.write_text(json.dumps(file_seconds(sys.argv[1]), indent=1) + "\n")
    print(f"wrote {OUTPUT}")
