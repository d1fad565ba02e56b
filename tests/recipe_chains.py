"""Runs README's recipe chains, tiny, on tfds mock data (tests/test_chains.py).

    python tests/recipe_chains.py ROOT flags/a.cfg flags/b.cfg ...

runs each flagfile in turn in this process, as `python -m simclr_tf
--flagfile=...` would (absl parses the flagfile), with small overrides
(image size 32, width 1/16, 2 steps, batch 8) and with every --model_dir,
--checkpoint and --teacher under ROOT: gs://BUCKET/x and runs/x become
ROOT/x. tfds serves mock data (tfds.testing.mock_data, no network: a
socket guard refuses any connection). Prints one JSON line per run: the
result, and this process's peak resident memory after it.
"""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import sys

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Values that make a run tiny without touching what must agree along a
# chain (architecture, head, dataset, train mode).
OVERRIDES = (
    "--train_steps=2",
    "--steps_per_loop=1",
    "--train_batch_size=8",
    "--eval_batch_size=8",
    "--max_eval_examples=16",
    "--linear_eval_epochs=1",
    "--knn_k=5",
    "--export_keras=false",
    "--precision=float32",
    "--strategy=default",
    "--seed=0",
    "--width_multiplier=0.0625",
    "--verbosity=0",  # INFO: the plan and progress lines, on stderr
)
MOCK_EXAMPLES = 16


def flag_values(path: str) -> dict[str, str]:
    """--name=value lines of a flagfile."""
    values = {}
    with open(os.path.join(REPOSITORY, path)) as file:
        for line in file:
            if line.startswith("--"):
                name, _, value = line[2:].strip().partition("=")
                values[name] = value
    return values


def header_model_dir(path: str) -> str:
    """The --model_dir of a flagfile's "# Command:" header line."""
    with open(os.path.join(REPOSITORY, path)) as file:
        header = "".join(line for line in file if line.startswith("#"))
    found = re.search(r"# Command:.*?--model_dir=(\S+)", header, re.DOTALL)
    if found is None:
        raise ValueError(f"{path}: no --model_dir in its # Command: line")
    return found.group(1)


def under(root: str, path: str) -> str:
    """gs://BUCKET/x or runs/x -> ROOT/x."""
    return os.path.join(root, re.sub(r"^(gs://BUCKET/|runs/)", "", path))


def overrides_for(path: str, root: str) -> list[str]:
    values = flag_values(path)
    found = [*OVERRIDES, f"--model_dir={under(root, header_model_dir(path))}"]
    if int(values.get("image_size", "224")) > 32:
        # The ImageNet stem at 32 px, as the real run has it at 224.
        found += ["--image_size=32", "--cifar_stem=false"]
    for name in ("checkpoint", "teacher"):
        if values.get(name):
            found.append(f"--{name}={under(root, values[name])}")
    if values.get("dataset", "").startswith("imagenet"):
        found.append(f"--data_dir={os.path.join(root, 'tfds')}")
    return found


def _refuse_network(*args: object, **kwargs: object) -> None:
    raise RuntimeError("network access while running a recipe chain")


def main(argv: list[str]) -> None:
    root, recipes = argv[1], argv[2:]
    socket.socket.connect = _refuse_network
    socket.getaddrinfo = _refuse_network
    sys.path.insert(0, REPOSITORY)
    import tensorflow_datasets as tfds
    from absl import flags, logging

    from simclr_tf import cli
    from simclr_tf.config import loading, validation

    logging.set_verbosity(logging.INFO)
    policy = tfds.testing.MockPolicy.USE_CODE
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, policy=policy):
        for recipe in recipes:
            flags.FLAGS.unparse_flags()
            flags.FLAGS(
                [
                    "simclr_tf",
                    f"--flagfile={recipe}",
                    *overrides_for(recipe, root),
                ]
            )
            config = validation.validate(loading.from_flags())
            result = cli.run(config)
            result.pop("config", None)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(
                "RESULT "
                + json.dumps(
                    {"recipe": recipe, "peak_rss_bytes": peak, **result},
                    default=str,
                ),
                flush=True,
            )


if __name__ == "__main__":
    os.chdir(REPOSITORY)
    main(sys.argv)
