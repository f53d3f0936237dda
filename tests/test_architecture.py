"""The shape of the house: who imports whom, a loop that reads at a glance, docstrings, shape comments.

python -m pytest tests/test_architecture.py

These read the sources (ast), so they hold for every file, not only the lines a
behaviour test happens to run.
"""

import ast
import os
import re

import pytest

from conftest import ROOT

# Each file and the project modules it may import (DESIGN.md's rooms). The plumbing imports no chapter.
ALLOWED = {
    "attention": set(),
    "vqvae": {"attention", "checkpoints"},
    "gpt": {"attention", "checkpoints", "vqvae"},
    "data": {"checkpoints", "runtime"},
    "train": {"checkpoints", "runtime", "data", "vqvae", "gpt", "fast", "run"},
    "run": {"checkpoints", "runtime", "data", "fast", "muon"},
    "sample": {"checkpoints", "runtime", "data", "gpt", "fast"},
    "fvd": {"checkpoints", "runtime", "data", "vqvae", "gpt", "fast", "metrics"},
    "metrics": {"checkpoints", "runtime", "data", "vqvae", "gpt", "fast"},
    "bench": {"runtime", "vqvae", "gpt", "fast", "muon", "sample"},
    "fast": {"attention", "gpt"},
    "muon": {"vqvae", "gpt"},
    "checkpoints": set(),
    "runtime": set(),
}


def tree(name):
    return ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())


def project_imports(name):
    found = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


def test_every_top_level_file_is_a_known_room():
    files = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert files == set(ALLOWED), f"files without a room in the design: {files ^ set(ALLOWED)}"


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_imports_follow_the_design_and_each_file_says_what_it_holds(name):
    extra = project_imports(name) - ALLOWED[name]
    assert not extra, f"{name}.py imports {sorted(extra)}, outside its room"
    doc = ast.get_docstring(tree(name))
    assert doc and len(doc.splitlines()) >= 3, f"{name}.py opens without a docstring saying what it holds"


def test_no_import_cycle():
    graph = {n: project_imports(n) for n in ALLOWED}
    done, path = set(), []

    def visit(n):
        assert n not in path, f"import cycle: {' -> '.join(path + [n])}"
        if n not in done:
            path.append(n)
            for m in graph[n]:
                visit(m)
            path.pop()
            done.add(n)
    for n in graph:
        visit(n)


def test_the_training_loop_reads_at_a_glance():
    """train.train holds the loop: at most 60 lines, no closures sharing state, no per-step .item()."""
    fn = next(n for n in tree("train").body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert fn.end_lineno - fn.lineno + 1 <= 60
    assert any(isinstance(n, ast.While) for n in ast.walk(fn))
    calls = {n.func.attr for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert "item" not in calls and "tolist" not in calls      # host syncs live in named helpers, read once per step
    for name in ALLOWED:
        assert not any(isinstance(n, ast.Nonlocal) for n in ast.walk(tree(name))), f"nonlocal in {name}.py"


def test_every_reshape_carries_a_shape_comment():
    reshape = re.compile(r"\.(view|reshape|permute|flatten|movedim|transpose|unflatten)\(")
    missing = []
    for name in ALLOWED:
        for i, line in enumerate(open(os.path.join(ROOT, f"{name}.py")), 1):
            code = line.split("#")[0]
            if reshape.search(code) and "#" not in line and not code.strip().startswith(('"', "'")):
                missing.append(f"{name}.py:{i}: {line.strip()}")
    assert not missing, "\n".join(missing)
