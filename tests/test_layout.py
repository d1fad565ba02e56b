"""The package's shape: its import graph has no cycle, training never reaches
evaluation or report rendering, modules stay readable, README's layout
names every module.

The graph is read from the source (every import statement, also those
inside functions and under TYPE_CHECKING), not from what a test run happens
to import.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "simclr_tf"
README = PACKAGE.parent / "README.md"
# STYLE.md aims at <= 400 lines a module; the layout issue set 450.
MAX_MODULE_LINES = 450
# Third-party packages only the reports need (pictures, t-SNE).
RENDERING_PACKAGES = ("PIL", "sklearn", "matplotlib")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
    """Every module `path` imports: simclr_tf modules by full name, and the
    top-level name of any other package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
    resolved = set()
    for name in found:
        if name.split(".")[0] != "simclr_tf":
            resolved.add(name.split(".")[0])
            continue
        # Importing a.b.c runs the __init__ of a and a.b as well.
        parts = name.split(".")
        resolved.update(
            ".".join(parts[:end])
            for end in range(1, len(parts) + 1)
            if ".".join(parts[:end]) in modules
        )
    return resolved


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: _imports(path, modules) - {name} for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for target in graph.get(node, ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_cycle_finder_finds_a_planted_cycle():
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(planted) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_package_has_no_import_cycle(graph):
    assert _cycles(graph) == []


# What a package __init__ may import: simclr_tf/__init__.py reads
# hardware.py, a leaf, to pick TensorFlow's CPU kernels before TensorFlow
# loads (hardware.onednn_switch), with os and sys.
INIT_IMPORTS = {"os", "sys", "simclr_tf.hardware"}


def test_package_inits_import_nothing(graph):
    # A package __init__ that imports its submodules would run on every
    # `from package import module` and hide cycles behind the package.
    for path in PACKAGE.rglob("__init__.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                names = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.module == "__future__":
                    continue
                names = {f"{node.module}.{alias.name}" for alias in node.names}
            else:
                continue
            assert names <= INIT_IMPORTS, f"{path} imports {ast.unparse(node)}"
    # The leaf imports no simclr_tf module, so it can hide no cycle.
    assert not {
        name for name in graph["simclr_tf.hardware"] if name != "simclr_tf"
    } & set(graph)


@pytest.mark.parametrize(
    "module",
    [
        "simclr_tf.training.loop",
        "simclr_tf.training.train_state",
        "simclr_tf.training.train_step",
        "simclr_tf.training.modes",
    ],
)
def test_training_never_reaches_evaluation_or_rendering(graph, module):
    reached = _reachable(graph, module)
    forbidden = {
        name
        for name in reached
        if name.startswith(
            ("simclr_tf.evaluation", "simclr_tf.reports", "simclr_tf.cli")
        )
        or name in RENDERING_PACKAGES
    }
    assert not forbidden, f"{module} reaches {sorted(forbidden)}"


def test_train_step_does_not_import_the_input_pipeline(graph):
    reached = _reachable(graph, "simclr_tf.training.train_step")
    assert "simclr_tf.data.pipeline" not in reached
    assert not any(
        name.startswith("simclr_tf.data.sources") for name in reached
    )


def test_source_base_is_below_every_source(graph):
    base = "simclr_tf.data.sources.base"
    assert not {n for n in graph[base] if n.startswith("simclr_tf.data")}
    for name in graph:
        if name.startswith("simclr_tf.data.sources.") and name not in (
            base,
            "simclr_tf.data.sources.registry",
        ):
            assert "simclr_tf.data.sources.registry" not in graph[name], name


def test_only_config_and_entry_points_read_absl_flags():
    entry_points = ("config", "cli.py", "tools")
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(entry_points):
            continue
        text = path.read_text()
        assert "absl import flags" not in text, relative
        assert not re.search(r"(?<![\w.])FLAGS\b", text), relative


def test_no_module_is_over_the_line_limit():
    long = {
        path.relative_to(PACKAGE).as_posix(): count
        for path in PACKAGE.rglob("*.py")
        if (count := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_every_module_opens_with_a_docstring():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), path.relative_to(PACKAGE)


def test_readme_layout_names_every_module():
    text = README.read_text()
    section = re.search(r"^## Layout\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, "README.md has no '## Layout' section"
    # The section draws a tree: each folder once ("training/"), then the
    # file names in it.
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if path.name in ("__init__.py", "__main__.py"):
            continue
        for name in (*(f"{part}/" for part in relative.parts[:-1]), path.name):
            assert name in section.group(1), f"README layout lacks {name}"
