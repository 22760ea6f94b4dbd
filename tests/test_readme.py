"""The README's Python example runs as written (with the bottle data wherever this machine has it)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_the_readme_python_example_runs(bottle, tmp_path):
    text = (REPO / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    assert all(step in code for step in (".fit(", ".predict(", ".partial_fit(", ".save(", "Padim.load("))
    code = code.replace("../shared/data/mvtec_ad/bottle", str(bottle))
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "100 " in run.stdout  # 60 fitted, 20 added, saved, loaded, 20 more
    assert (tmp_path / "model.padim").is_file()
