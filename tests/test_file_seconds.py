"""tests/file_seconds.json, which orders the test files for xdist: read from
a JUnit report, and kept in step with the files in tests/."""

from __future__ import annotations

import json
import pathlib

import file_seconds

TESTS = pathlib.Path(__file__).parent


def test_file_seconds_sums_each_files_cases(tmp_path):
    report = tmp_path / "report.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="one" time="1.21"/>'
        '<testcase classname="tests.test_b" name="two" time="0.5"/>'
        '<testcase classname="tests.test_a" name="three" time="2.0"/>'
        "</testsuite></testsuites>"
    )
    assert file_seconds.file_seconds(str(report)) == {
        "test_a.py": 3.2,  # 3.21 to one decimal
        "test_b.py": 0.5,
    }


def test_every_measured_file_exists():
    """A renamed or removed file's entry would never match again (a new
    file runs first until measured). Refresh:
    `python tests/file_seconds.py <junit xml>`."""
    measured = set(json.loads(file_seconds.OUTPUT.read_text()))
    present = {path.name for path in TESTS.glob("test_*.py")}
    assert measured <= present, sorted(measured - present)
