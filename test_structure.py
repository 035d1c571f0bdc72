"""
The repository's shape: imports run one way (scripts import modules, no module imports a script, no cycles,
imports inside functions included), each backbone file stands alone, and nothing points outside the repository.
"""
import ast
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(f for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith(("test_", "conftest")))
PROJECT = {f[:-3] for f in SOURCES}
SCRIPTS = {"train_cifar", "sample", "bench", "gpu_report", "extract_latents"}        # command-line programs; fid.py is a module with a CLI too
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
