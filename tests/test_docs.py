"""The README and the pages under docs/ run as written and point at what exists.

Every ```python block of a page runs, the page's blocks in order in one fresh process (so a page may build on
its own earlier blocks, never on another page's), offline, from a scratch folder, with the checkout on
PYTHONPATH. Blocks that would download or train for long are fenced as ```text with the reason beside them.
Shell blocks are not run, but each ``python -m MODULE`` they name must exist. Relative links must reach a
file (and a heading, for ``#anchor``), and every path in the README's map must exist.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGE_IDS = [str(page.relative_to(ROOT)) for page in PAGES]


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def python_pages() -> list[Path]:
    return [page for page in PAGES if blocks(page, "python")]


def test_the_readme_starts_with_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    first_block = blocks(ROOT / "README.md", "bash")[0]
    ci_command = next(line for line in (ROOT / ".ci/run").read_text().splitlines() if "pytest" in line
                      and "pip install" in line)
    assert ci_command in first_block.splitlines()
    assert readme.index("```bash") < readme.index("## Quick start") < readme.index("## Contents")
    assert len(readme.splitlines()) <= 200


@pytest.mark.parametrize("page", python_pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_python_blocks_run_as_written(page, tmp_path):
    if "flaxnets.export" in page.read_text() and importlib.util.find_spec("flatbuffers") is None:
        pytest.skip("the export block needs flatbuffers: pip install -e '.[export]'")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLAXNETS_CACHE_DIR": str(tmp_path / "cache"),
           "FLAXNETS_WEIGHTS_URL": str(tmp_path / "no-weights-here")}  # nothing may download
    result = subprocess.run([sys.executable, "-c", "\n".join(blocks(page, "python"))], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    if page.name == "research.md":
        assert "('layer1', 64, 4), ('layer2', 128, 8), ('layer3', 256, 16), ('layer4', 512, 32)" in result.stdout
        assert "agrees with the JAX model" in result.stdout
        assert (tmp_path / "runs" / "resnet20-c100" / "model.safetensors").is_file()
    if page.name == "README.md":
        assert "(2, 10)" in result.stdout


def _module_exists(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    if path.with_suffix(".py").is_file() or (path / "__main__.py").is_file():
        return True
    return name.split(".")[0] not in {"train", "flaxnets", "benchmarks", "tests"} and \
        importlib.util.find_spec(name.split(".")[0]) is not None


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_shell_blocks_name_modules_that_exist(page):
    shell = "\n".join(blocks(page, "bash"))
    names = set(re.findall(r"python3? -m ([A-Za-z_][\w.]*)", shell))
    assert [name for name in sorted(names) if not _module_exists(name)] == []


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_relative_links_reach_a_file(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in _anchors(file)):
            broken.append(target)
    assert broken == []


def _defines(file: Path, name: str) -> bool:
    pattern = rf"^\s*(?:def|class)\s+{name}\b|^{name}\s*[:=]|^\s*from\s+\S+\s+import\s.*\b{name}\b"
    return re.search(pattern, file.read_text(), flags=re.M) is not None


def test_every_path_of_the_map_exists():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Map"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    paths = [code for code in re.findall(r"`([^`]+)`", section) if "/" in code and not code.startswith("WORKDIR")
             and " " not in code and "<" not in code]
    assert len(paths) >= 10
    missing = []
    for entry in paths:
        path, _, name = entry.partition(":")
        if not (ROOT / path).exists() or (name and not _defines(ROOT / path, name)):
            missing.append(entry)
    assert missing == []
