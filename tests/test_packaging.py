"""The package mapping in pyproject.toml is the one way `dtllama.ops` / `dtllama.parallel` resolve."""

import importlib.util
import subprocess
import sys

from helpers import ROOT


def test_only_the_mapped_subpackages_are_importable():
    import dtllama  # noqa: F401

    assert importlib.util.find_spec("dtllama.ops").origin.endswith("ops/__init__.py")
    assert importlib.util.find_spec("dtllama.parallel").origin.endswith("parallel/__init__.py")
    for stray in ("dtllama.tests", "dtllama.recipes", "dtllama.bench", "dtllama.scripts"):
        assert importlib.util.find_spec(stray) is None, stray


def test_an_uninstalled_source_tree_says_how_to_install(tmp_path):
    # -S: no site-packages, so no install of dtllama is visible; only the source tree is on the path.
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import dtllama"
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert "ImportError: dtllama.ops / dtllama.parallel are not importable" in proc.stderr
    assert "pip install -e ." in proc.stderr
