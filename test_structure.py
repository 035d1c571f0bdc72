"""
The repository's shape: imports run one way (scripts import modules, no module imports a script, no cycles,
imports inside functions included), each backbone file stands alone, and nothing points outside the repository.
"""
import ast
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(f for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith(("test_", "conftest")))
PROJECT = {f[:-3] for f in SOURCES}
# command-line programs; fid.py is a module with a CLI too
SCRIPTS = {"train_cifar", "sample", "bench", "gpu_report", "extract_latents"}
BACKBONES = {"dit", "uvit", "diffit", "genvit"}


def project_imports(name):
    """Project modules that `name`.py imports anywhere in the file (top level or inside functions)."""
    with open(os.path.join(HERE, name + ".py")) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out & PROJECT


GRAPH = {m: project_imports(m) for m in PROJECT}


def test_no_module_imports_a_script():
    for mod, deps in GRAPH.items():
        allowed = {"gpu_report": {"bench"}}.get(mod, set())  # gpu_report runs bench's rows: one way
        assert not (deps & SCRIPTS) - allowed, f"{mod}.py imports the script(s) {(deps & SCRIPTS) - allowed}"


def test_imports_have_no_cycle():
    done, stack = set(), []

    def visit(m):
        assert m not in stack, f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}"
        if m in done:
            return
        stack.append(m)
        for d in GRAPH[m]:
            visit(d)
        stack.pop()
        done.add(m)
    for m in sorted(GRAPH):
        visit(m)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_backbone_files_import_no_project_module(backbone):
    assert GRAPH[backbone] == set()


def test_nothing_points_outside_the_repository():
    """Code, tests and docs cite papers and official repositories, never notes that a clone does not have."""
    banned = ["../" + "shared", "/work/" + "shared", "anchors" + ".md", "ecosystem" + ".md", "diffit" + ".md",
              "anchors " + "§", "lent " + "to our"]
    files = [f for f in os.listdir(HERE) if f.endswith((".py", ".md")) or f == "run"]
    for name in files + [os.path.join(".ci", "run"), os.path.join("reference", "README.md")]:
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            text = f.read()
        for b in banned:
            assert b not in text, f"{name} mentions {b!r}"


# ----- The reading path: what a student reads to follow one training step and one sampling run -----

def reading_path(run):
    """{file: lines} a reader follows while run() executes: the non-blank lines of every function and method of the
    repository's modules that runs (its whole definition, docstring and comments included), plus the header and
    class-level lines of each class one of whose methods runs. Module-level code is not counted."""
    sources = {os.path.join(HERE, f) for f in SOURCES}
    reached = set()

    def on_call(frame, event, arg):
        if event == "call" and frame.f_code.co_filename in sources:
            reached.add((frame.f_code.co_filename, frame.f_code.co_firstlineno, frame.f_code.co_name))
    sys.setprofile(on_call)
    try:
        run()
    finally:
        sys.setprofile(None)
    counts = {}
    for path in sorted({r[0] for r in reached}):
        with open(path) as f:
            text = f.read().splitlines()
        hits, lines = {(n, name) for p, n, name in reached if p == path}, set()
        tree = ast.parse("\n".join(text))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if (first, node.name) in hits or (node.lineno, node.name) in hits:
                    lines |= set(range(first, node.end_lineno + 1))
            elif isinstance(node, ast.Lambda) and (node.lineno, "<lambda>") in hits:
                lines |= set(range(node.lineno, node.end_lineno + 1))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and lines & set(range(node.lineno, node.end_lineno + 1)):
                lines.add(node.lineno)
                for sub in node.body:
                    if not isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                        lines |= set(range(sub.lineno, sub.end_lineno + 1))
        counts[os.path.basename(path)] = sum(1 for i in lines if text[i - 1].strip())
    return counts


def test_reading_path_budgets(cifar_dir, tmp_path):
    """One DiT training step on CIFAR-10 reads <= 900 lines; one sampling run of its checkpoint <= 650 (README)."""
    import sample
    import train_cifar
    run = str(tmp_path / "run")
    train = reading_path(lambda: train_cifar.main(["--backbone", "dit", "--model", "DiT-Tiny", "--steps", "1",
                                                   "--batch-size", "4", "--sample-every", "0", "--data-dir",
                                                   cifar_dir, "--out-dir", run]))
    sampling = reading_path(lambda: sample.main(["--ckpt", os.path.join(run, "latest.pt"), "--num-samples", "2",
                                                 "--steps", "2"]))
    assert {"dit.py", "diffusion.py", "train_cifar.py"} <= set(train) and {"dit.py", "sample.py"} <= set(sampling)
    assert sum(train.values()) <= 900, train
    assert sum(sampling.values()) <= 650, sampling
