"""Tests of simclr_tf/__init__.py: the TensorFlow check at import.

Each case imports simclr_tf in a fresh Python with a stand-in `tensorflow`
module (or none), so no real TensorFlow is loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_with_fake_tensorflow(tmp_path, version: str | None):
    """Imports simclr_tf beside a fake tensorflow of `version` (None: none)."""
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"__version__ = {version!r}\n")
    hide = "sys.modules['tensorflow'] = None; " if version is None else ""
    return subprocess.run(
        [sys.executable, "-c", f"import sys; {hide}import simclr_tf"],
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPOSITORY}"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("version", ["2.20.0", "2.21.0", "2.22.0rc0"])
def test_import_accepts_tensorflow_2_20_and_newer(tmp_path, version):
    finished = _import_with_fake_tensorflow(tmp_path, version)
    assert finished.returncode == 0, finished.stderr


@pytest.mark.parametrize("version", ["2.19.1", "2.17.0", "1.15.5"])
def test_import_names_an_old_tensorflow_and_the_fix(tmp_path, version):
    finished = _import_with_fake_tensorflow(tmp_path, version)
    assert finished.returncode != 0
    last = finished.stderr.strip().splitlines()[-1]
    assert last == (
        f"ImportError: simclr_tf needs TensorFlow 2.20 or 2.21, found "
        f"{version}: pip install 'simclr_tf[cpu]' (or [gpu], or [tpu]) to "
        "upgrade it."
    )


def test_import_without_tensorflow_names_the_extras(tmp_path):
    finished = _import_with_fake_tensorflow(tmp_path, None)
    assert finished.returncode != 0
    last = finished.stderr.strip().splitlines()[-1]
    assert last == (
        "ImportError: simclr_tf needs TensorFlow 2.20 or 2.21 and none is "
        "installed: pip install 'simclr_tf[cpu]' (or [gpu], or [tpu] on a "
        "TPU VM)."
    )
