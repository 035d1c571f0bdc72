"""
demo.ipynb runs headless from top to bottom (nbclient, a test-only dependency), shrunk by its DEMO_* variables:
a few training steps on the tiny CIFAR-10 archive, the loss plot and grid, two samplers; its outputs stay cleared
in git.
"""
import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_notebook_is_stored_without_outputs():
    with open(os.path.join(HERE, "demo.ipynb")) as f:
        nb = json.load(f)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_notebook_runs_headless(cifar_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    out = tmp_path / "demo"
    for k, v in dict(DEMO_STEPS=4, DEMO_BATCH=8, DEMO_SAMPLE_STEPS=2, DEMO_SAMPLES=4, DEMO_DATA=cifar_dir,
                     DEMO_OUT=out).items():
        monkeypatch.setenv(k, str(v))
    nb = nbformat.read(os.path.join(HERE, "demo.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 4  # loss plot, the run's grid, two samplers
    assert (out / "ddim.png").exists() and (out / "dpm++2m.png").exists() and (out / "latest.pt").exists()
