"""The shape of the house (docs/design.md): who imports whom, the lesson's budget, no speed
machinery in the model chapters, a loop that reads at a glance, docstrings, shape comments.

python -m pytest tests/test_architecture.py

These read the sources (ast), so they hold for every file, not only the lines a
behaviour test happens to run.
"""

import ast
import os
import re

import pytest

from conftest import ROOT

# Each file and the project modules it may import (docs/design.md's rooms). The plumbing imports no
# chapter.
ALLOWED = {
    "attention": set(),
    "vqvae": {"attention", "checkpoints"},
    "gpt": {"attention", "checkpoints", "vqvae"},
    "data": {"checkpoints", "runtime"},
    "train": {"checkpoints", "runtime", "data", "vqvae", "gpt", "fast", "muon", "run"},
    # a fine-tune's VQ-VAE: gpt.embedded_vqvae, vqvae.load_vqvae
    "run": {"checkpoints", "runtime", "data", "vqvae", "gpt", "fast", "muon"},
    # world.named_actions: --actions
    "sample": {"checkpoints", "runtime", "data", "gpt", "fast", "world"},
    "fvd": {"checkpoints", "runtime", "data", "vqvae", "gpt", "fast", "metrics"},
    "metrics": {"checkpoints", "runtime", "data", "vqvae", "gpt", "fast", "world"},
    "bench": {"runtime", "vqvae", "gpt", "fast", "muon", "run", "world"},
    # the play loop: engineering beside the chapters
    "world": {"attention", "checkpoints", "data", "gpt", "fast"},
    "play": {"checkpoints", "runtime", "data", "world"},
    "fast": {"attention", "gpt"},
    "muon": {"vqvae", "gpt"},
    "checkpoints": set(),
    "runtime": set(),
}


# The converters (prepare/): each dataset's file, importing the data chapter, the plumbing, and the
# engineering's real game (world.make_game); prepare/__main__.py dispatches to them.
CONVERTERS = {"data", "checkpoints", "runtime", "world", "prepare"}
# The commands and the converters: nothing imports them, not even inside a function (tests aside).
COMMANDS = {"train", "sample", "fvd", "play", "bench", "prepare"}
MODEL_CHAPTERS = ("attention", "vqvae", "gpt")


def tree(name):
    return ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())


def lines(path):
    with open(os.path.join(ROOT, path)) as f:
        return sum(1 for _ in f)


def project_imports(name):
    found = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & (set(ALLOWED) | {"prepare"})


def test_every_top_level_file_is_a_known_room():
    files = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert files == set(ALLOWED), f"files without a room in the design: {files ^ set(ALLOWED)}"
    assert len(files) <= 16, (f"{len(files)} Python files at the top level; the rest belong in "
                              "folders")
    design = open(os.path.join(ROOT, "docs", "design.md")).read()
    assert all(f"`{name}.py`" in design for name in ALLOWED), "docs/design.md names every room"


def test_the_lesson_stays_within_its_budget():
    """The chapters a learner reads stay lean: engineering goes beside them, history to docs/. The
    budgets leave room for blank lines, asserts on lines of their own and whole sentences."""
    assert sum(lines(f"{n}.py") for n in MODEL_CHAPTERS) <= 1300
    for path, budget in (("train.py", 500), ("data.py", 700), ("fvd.py", 560), ("README.md", 300)):
        assert lines(path) <= budget, f"{path}: {lines(path)} lines, budget {budget}"


def test_the_model_chapters_use_plain_names_and_leave_the_history_to_docs():
    """The original release's module names live in checkpoints.py's key table, not in the lesson,
    and "original" is said where exactness needs a note, not to tell history."""
    text = {n: open(os.path.join(ROOT, f"{n}.py")).read() for n in MODEL_CHAPTERS}
    for old in ("AttentionStack", "attn_stack", "attn_nets", "enc_attn", "pre_enc_norm", "bnr1",
                "bnr2", "proj_bnr", "fc_block"):
        for name, source in text.items():
            assert old not in source, f"{name}.py says {old}"
    assert sum(source.lower().count("original") for source in text.values()) <= 15


def test_no_function_runs_past_100_lines():
    """A function a reader can hold in view: the commands, converters and tools included."""
    for path in (os.path.join(folder, name) for folder in ("", "prepare", "docs", "weights")
                 for name in sorted(os.listdir(os.path.join(ROOT, folder)))
                 if name.endswith(".py")):
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 100, f"{path}: {node.name} is {length} lines"


def test_the_model_chapters_hold_no_speed_machinery():
    """No compiling, inductor settings, FlexAttention or per-device choices in attention/vqvae/gpt:
    a faster kernel comes in as one argument (MultiHeadAttention.attend), from fast.py."""
    for name in MODEL_CHAPTERS:
        source = open(os.path.join(ROOT, f"{name}.py")).read()
        for machinery in ("torch.compile", "_inductor", "flex_attention",
                          "scaled_dot_product_attention", "device.type ==", "is_compiling"):
            assert machinery not in source, f"{name}.py holds {machinery}"


def test_arrows_run_one_way_nothing_imports_a_command_or_a_converter():
    """The commands and the converters import the rest; the rest imports neither of them."""
    for name in sorted(ALLOWED):
        found = project_imports(name) & COMMANDS
        assert not found, f"{name}.py imports {sorted(found)}"


def test_the_converters_import_the_data_chapter_and_the_plumbing_only():
    for path in sorted(os.listdir(os.path.join(ROOT, "prepare"))):
        if path.endswith(".py"):
            found = set()
            for node in ast.walk(ast.parse(open(os.path.join(ROOT, "prepare", path)).read())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module.split(".")[0])
            extra = (found & (set(ALLOWED) | {"prepare"})) - CONVERTERS
            assert not extra, f"prepare/{path} imports {sorted(extra)}"


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_imports_follow_the_design_and_each_file_says_what_it_holds(name):
    extra = project_imports(name) - ALLOWED[name]
    assert not extra, f"{name}.py imports {sorted(extra)}, outside its room"
    doc = ast.get_docstring(tree(name))
    assert doc and len(doc.splitlines()) >= 3, (f"{name}.py opens without a docstring saying what "
                                                "it holds")


def test_no_import_cycle():
    graph = {n: project_imports(n) for n in ALLOWED}
    done, path = set(), []

    def visit(n):
        assert n not in path, f"import cycle: {' -> '.join(path + [n])}"
        if n not in done:
            path.append(n)
            for m in graph[n] - {"prepare"}:   # the converters' folder: its own test below
                visit(m)
            path.pop()
            done.add(n)
    for n in graph:
        visit(n)


def test_the_training_loop_reads_at_a_glance():
    """train.train holds the loop: at most 60 lines, no closures sharing state, no per-step
    .item()."""
    fn = next(n for n in tree("train").body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert fn.end_lineno - fn.lineno + 1 <= 60
    assert any(isinstance(n, ast.While) for n in ast.walk(fn))
    calls = {n.func.attr for n in ast.walk(fn) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute)}
    # host syncs live in named helpers, read once per step
    assert "item" not in calls and "tolist" not in calls
    for name in ALLOWED:
        assert not any(isinstance(n, ast.Nonlocal) for n in ast.walk(tree(name))), ("nonlocal in "
                                                                                    f"{name}.py")


def test_every_reshape_carries_a_shape_comment():
    reshape = re.compile(r"\.(view|reshape|permute|flatten|movedim|transpose|unflatten)\(")
    missing = []
    for name in ALLOWED:
        for i, line in enumerate(open(os.path.join(ROOT, f"{name}.py")), 1):
            code = line.split("#")[0]
            if reshape.search(code) and "#" not in line and not code.strip().startswith(('"', "'")):
                missing.append(f"{name}.py:{i}: {line.strip()}")
    assert not missing, "\n".join(missing)
