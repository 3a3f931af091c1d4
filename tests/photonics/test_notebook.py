"""photonics/regression.ipynb executes headlessly, top to bottom, with the quick parameters (ESSL_NB_QUICK=1).

The kernel is "python3" of the running interpreter: jupyter_client replaces the kernelspec's bare ``python``
with ``sys.executable``, so the notebook imports the same (venv) essl as the tests. Matplotlib draws with Agg.
"""

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[2] / "photonics" / "regression.ipynb"
#: Seconds allowed per cell (the quick notebook takes well under a minute in all).
CELL_TIMEOUT = 300
#: PNG files the notebook writes into ESSL_NB_OUT.
FIGURES = ("unit_cells", "band_diagram", "dos", "pretraining_curves", "error_vs_labels", "dos_predictions")
#: Committed notebooks keep their outputs cleared (a small file, no stale results).
MAX_NOTEBOOK_BYTES = 40_000


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    assert NOTEBOOK.stat().st_size < MAX_NOTEBOOK_BYTES


def test_notebook_executes_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("ESSL_NB_QUICK", "1")
    monkeypatch.setenv("ESSL_NB_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the traceback) on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "labels:" in text and "notebook ran in" in text
    out = tmp_path / "out"
    for name in FIGURES:  # with MPLBACKEND=Agg plt.show() draws nothing: the notebook also saves every figure
        assert (out / f"{name}.png").stat().st_size > 0, name
    assert (out / "pretrain" / "levelset_e-simclr" / "encoder.pt").exists()
    assert sys.executable  # the kernel ran this interpreter (module docstring)
