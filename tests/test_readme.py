"""The documentation runs: every Python snippet of README.md and docs/*.md, and the walkthrough.

python -m pytest tests/test_readme.py
"""

import glob
import os
import re
import shlex

import pytest

from conftest import ROOT, run_script

PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                               for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


@pytest.mark.parametrize("page", PAGES)
def test_python_snippets_run(page):
    text = open(os.path.join(ROOT, page)).read()
    for code in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(code, page, "exec"), {})


def test_the_readme_has_snippets_and_links_only_to_files_that_exist():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert re.findall(r"```python\n(.*?)```", text, flags=re.S), "README.md has no python snippet"
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)", open(os.path.join(ROOT, page)).read()):
            if not target.startswith("http"):
                path = os.path.join(ROOT, os.path.dirname(page), target)
                assert os.path.exists(path), f"{page} links to {target}, which does not exist"


def documented_commands(script):
    """The arguments of every `python SCRIPT ...` / `torchrun ... SCRIPT ...` command in the pages'
    bash blocks."""
    for page in PAGES:
        text = open(os.path.join(ROOT, page)).read()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for command in line.split("#")[0].split("&&"):
                    words = shlex.split(command)
                    launcher = words and words[0] in ("python", "torchrun", "srun")
                    if script in words and "..." not in words and launcher:
                        yield page, words[words.index(script) + 1:]


@pytest.mark.parametrize("script,at_least", [("train.py", 10), ("play.py", 4)])
def test_every_documented_command_parses(script, at_least):
    """Each train.py and play.py command of the README and docs/ takes flags the script has (a
    renamed flag fails here)."""
    import importlib
    module = importlib.import_module(script[:-3])
    commands = list(documented_commands(script))
    assert len(commands) >= at_least
    for page, argv in commands:
        try:
            module.parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"{page}: python {script} {' '.join(argv)}: does not parse") from e


def test_the_walkthrough_runs_and_draws_every_picture(tmp_path):
    env = dict(os.environ, WALKTHROUGH_STEPS="3", WALKTHROUGH_OUT=str(tmp_path))
    r = run_script("docs/walkthrough.py", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sampled (4, 4, 8, 8) codes -> (4, 3, 8, 32, 32) video" in r.stdout
    for name in ("1_clips", "2_reconstructions", "3_attention_masks", "5_kv_cache", "6_samples"):
        with open(tmp_path / f"{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
