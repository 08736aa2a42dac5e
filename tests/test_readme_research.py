"""The README's research section runs as written: its Python blocks, in order, in one fresh process, offline,
from a scratch folder (they save under runs/ and read back what they saved)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def research_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("<!-- research-snippets:"):text.index("<!-- research-snippets-end -->")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.skipif(importlib.util.find_spec("flatbuffers") is None,
                    reason="the export block needs flatbuffers: pip install -e '.[export]'")
def test_the_research_snippets_run_as_written(tmp_path):
    blocks = research_blocks()
    assert len(blocks) == 4
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLAXNETS_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "('layer1', 64, 4), ('layer2', 128, 8), ('layer3', 256, 16), ('layer4', 512, 32)" in result.stdout
    assert "agrees with the JAX model" in result.stdout
    assert (tmp_path / "runs" / "resnet18-c100" / "model.safetensors").is_file()
