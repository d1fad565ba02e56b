"""README's recipe chains run end to end, tiny, on mock data.

Each chain's links must name the run before them (a flagfile's
--checkpoint or --teacher is the --model_dir of the previous flagfile's
`# Command:` line) and agree on what must carry over; then
tests/recipe_chains.py runs the chain in a fresh process (tfds mock
imagenet2012 / imagenet2012_subset, Fashion-MNIST's files, 32 px, width
1/16, 2 steps each), so a flag that does not carry over (a 2-layer head
restored into a 3-layer one, ...) fails here rather than after 15 hours.
The first ImageNet chain also checks the run's peak memory against its
plan.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import recipe_chains

REPOSITORY = recipe_chains.REPOSITORY
# Flags a link must share with the run it restores (the encoder, the
# projection head it reads and the input size that picks the stem).
CARRIED = (
    "resnet_depth",
    "width_multiplier",
    "sk_ratio",
    "se_ratio",
    "image_size",
    "num_proj_layers",
)


def readme_chains() -> list[list[str]]:
    """The `flags/a.cfg` → `flags/b.cfg` lines of README's chain list."""
    with open(os.path.join(REPOSITORY, "README.md")) as file:
        text = file.read()
    section = text.split("### Recipe chains", 1)[1].split("\n#", 1)[0]
    return [
        re.findall(r"`(flags/[\w.]+\.cfg)`", line)
        for line in section.splitlines()
        if "→" in line
    ]


CHAINS = readme_chains()


def test_readme_lists_every_imagenet_and_demo_recipe_in_a_chain():
    listed = {recipe for chain in CHAINS for recipe in chain}
    flagfiles = {
        f"flags/{name}"
        for name in os.listdir(os.path.join(REPOSITORY, "flags"))
        if name.startswith(("imagenet", "demo"))
    }
    assert listed == flagfiles


@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: "->".join(c))
def test_each_link_names_the_run_before_it(chain):
    for before, after in zip(chain, chain[1:], strict=False):
        values = recipe_chains.flag_values(after)
        source = values.get("teacher") or values.get("checkpoint")
        assert source == recipe_chains.header_model_dir(before), after
        if "checkpoint" in values:  # restores encoder and head weights
            earlier = recipe_chains.flag_values(before)
            for name in CARRIED:
                assert earlier.get(name) == values.get(name), (after, name)


def _run_chain(chain: list[str], root) -> list[dict]:
    finished = subprocess.run(
        [
            sys.executable,
            os.path.join(REPOSITORY, "tests", "recipe_chains.py"),
            str(root),
            *chain,
        ],
        env={
            **os.environ,
            "PYTHONPATH": REPOSITORY,
            "TF_CPP_MIN_LOG_LEVEL": "3",
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = [
        json.loads(line[len("RESULT ") :])
        for line in finished.stdout.splitlines()
        if line.startswith("RESULT ")
    ]
    assert [r["recipe"] for r in results] == chain
    return results, finished.stderr


@pytest.mark.slow  # 2-5 min a chain on 2 shared CPU cores
@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: "->".join(c))
def test_chain_runs_end_to_end_on_mock_data(chain, tmp_path):
    results, log = _run_chain(chain, tmp_path)
    for result in results:
        assert result["step"] == 2
        assert os.path.isdir(result["export_path"])
        assert 0 <= result["eval/top_1"] <= 1
    first = results[0]
    if first["recipe"] != "flags/imagenet.cfg":
        return
    # The pretraining run reports its online head (GR's number), the
    # frozen-feature protocol, kNN and both baselines.
    for name in (
        "online/top_1",
        "top_1",
        "knn/top_1",
        "random_init/top_1",
        "pixels/top_1",
    ):
        assert 0 <= first[f"eval/{name}"] <= 1, name
    # The plan came before the first step, and the process stayed under
    # the host memory it planned (training, evaluation, runtime).
    assert log.index("memory plan per host") < log.index("step 1/2")
    assert first["peak_rss_bytes"] <= first["plan/host_bytes"]
