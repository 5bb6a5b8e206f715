"""Every Python block of the README runs as written (the quickstarts cannot rot), and it stays short."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_is_short_and_has_the_quickstarts():
    # the generated tables grow with each published experiment; the hand-written text stays short
    text = re.sub(r"<!-- (summary|bench[^>]*) -->\n.*?<!-- /(summary|bench) -->", "", README.read_text(), flags=re.S)
    assert len(text.splitlines()) <= 230
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, tmp_path):
    pytest.importorskip("transformers")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", BLOCKS[i]], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"README block {i} failed:\n{BLOCKS[i]}\n{res.stderr[-3000:]}"
