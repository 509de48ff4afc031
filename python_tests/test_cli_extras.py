"""The console script without the [demo] extra (tqdm, scikit-learn, matplotlib missing):
--help works, and the demo says which extra to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Runs the command line with the demo's extra modules made unimportable.
WITHOUT_EXTRAS = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tqdm", "sklearn", "matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from mergopt_kernels.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def run_without_extras(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"]], ids=" ".join)
def test_help_works_without_the_demo_extra(args):
    result = run_without_extras(*args)
    assert result.returncode == 0, result.stderr
    assert "usage: mergopt-kernels" in result.stdout and "Traceback" not in result.stderr


def test_demo_without_its_extra_names_the_extra_to_install():
    result = run_without_extras("demo", "--quick")
    assert result.returncode == 2
    assert "mergopt_kernels[demo]" in result.stderr and "'tqdm'" in result.stderr
    assert "Traceback" not in result.stderr
