"""The README's one-line demos, copied from it verbatim, run (two steps each on 64 images, into a temporary folder)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
DEMOS = sorted({m.group(1).strip() for m in re.finditer(r"^(python \w+\.py --preset tiny[^#\n]*)", README, re.M)})


def test_the_readme_has_a_demo_for_every_training_script():
    assert {d.split()[1] for d in DEMOS} >= {"mae.py", "simmim.py", "localmim.py", "maskalign.py", "finetune.py"}


@pytest.mark.parametrize("command", DEMOS)
def test_readme_demo_runs(command, tmp_path):
    argv = command.split()[1:] + ["--steps", "2", "--num-images", "64", "--workers", "0", "--out", str(tmp_path / "run")]
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done: 2 steps" in r.stdout
