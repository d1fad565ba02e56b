"""tests/file_seconds.json, which orders the test files for xdist: read from
a JUnit report, and kept in step with the files in tests/."""

from __future__ import annotations

import json
import math
import pathlib
import re

import file_seconds

TESTS = pathlib.Path(__file__).parent


def test_report_gives_each_tests_seconds(tmp_path):
    report = tmp_path / "report.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="one" time="1.21"/>'
        '<testcase classname="tests.test_b" name="two[x-1]" time="0.5"/>'
        '<testcase classname="tests.test_a" name="three" time="2.0"/>'
        '<testcase classname="tests.test_a" name="four" time="0.01">'
        '<skipped message="offline"/></testcase>'
        "</testsuite></testsuites>"
    )
    # 1.21 to one decimal; the skipped "four" left out.
    assert file_seconds.test_seconds(str(report)) == {
        "test_a.py": {"one": 1.2, "three": 2.0},
        "test_b.py": {"two[x-1]": 0.5},
    }


def test_refresh_keeps_tests_the_reports_did_not_run():
    old = {"test_a.py": {"fast": 1.0, "slow": 90.0}, "test_b.py": {"b": 2.0}}
    fast_run = {"test_a.py": {"fast": 1.5}, "test_c.py": {"c": 3.0}}
    later = {"test_c.py": {"c": 4.0}}
    assert file_seconds.merged(old, [fast_run, later]) == {
        "test_a.py": {"fast": 1.5, "slow": 90.0},
        "test_b.py": {"b": 2.0},
        "test_c.py": {"c": 4.0},
    }


def test_a_file_weighs_what_its_selected_tests_took():
    seconds = {"test_chains.py": {"list": 0.1, "chain[a]": 200.0}}
    seconds["test_train.py"] = {"fast": 100.0, "kill": 30.0}
    fast = file_seconds.file_weights(
        [("test_chains.py", "list"), ("test_train.py", "fast")], seconds
    )
    assert fast == {"test_chains.py": 0.1, "test_train.py": 100.0}
    slow = file_seconds.file_weights(
        [
            ("test_chains.py", "chain[a]"),
            ("test_train.py", "kill"),
            ("test_new.py", "x"),
            ("test_train.py", "new"),  # not measured yet: 0 in a known file
        ],
        seconds,
    )
    assert slow == {
        "test_chains.py": 200.0,
        "test_train.py": 30.0,
        "test_new.py": math.inf,
    }


def test_every_measured_file_exists():
    """A renamed or removed file's entry would never match again (a new
    file runs first until measured). Refresh:
    `python tests/file_seconds.py <junit xml>...`."""
    measured = set(json.loads(file_seconds.OUTPUT.read_text()))
    present = {path.name for path in TESTS.glob("test_*.py")}
    assert measured <= present, sorted(measured - present)


def test_every_measured_test_exists():
    """A renamed test's entry only lingers (a refresh keeps what its
    reports did not run): remove it from the JSON."""
    for name, tests in json.loads(file_seconds.OUTPUT.read_text()).items():
        defined = set(
            re.findall(r"^def (test_\w+)", (TESTS / name).read_text(), re.M)
        )
        stale = sorted({test.split("[")[0] for test in tests} - defined)
        assert not stale, (name, stale)


def test_files_go_out_by_the_seconds_of_the_tests_that_run(request):
    """This run's own order (after `-m`/`-k` deselection): each file after
    the files that weigh more, by the seconds of its selected tests."""
    items = request.session.items
    weights = file_seconds.file_weights(
        ((item.path.name, item.name) for item in items),
        json.loads(file_seconds.OUTPUT.read_text()),
    )
    order = list(dict.fromkeys(item.path.name for item in items))
    assert [weights[name] for name in order] == sorted(
        (weights[name] for name in order), reverse=True
    )
