"""examples/quickstart.ipynb runs in a real Jupyter kernel (nbclient + ipykernel): it trains the
notebook's own class, sweeps, shows the plots inline and loads a run back, with no error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from test_run import check_run_dir

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_runs_in_a_kernel(tmp_path: Path) -> None:
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    nb = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors

    def shown(fragment: str) -> dict:
        """The outputs of the cell whose source contains `fragment`, by mime type."""
        cell = next(c for c in code if fragment in c.source)
        data: dict = {}
        for out in cell.outputs:
            data.update(out.get("data", {}))
            if out.output_type == "stream":
                data["stream"] = data.get("stream", "") + out.text
        return data

    assert "Run(status='completed'" in shown("run = cnnlab.train(")["text/plain"]
    assert "train_loss" in shown("run.metrics")["text/html"]
    for cell in ("run.plot()", "run.confusion()"):
        assert shown(cell)["image/png"], cell  # the figure itself, inline
    assert shown("sweep.table")["text/html"].count("completed") == 2
    assert "'completed'" in shown("old = cnnlab.load_run")["text/plain"]
    assert "model=resnet is not a model config; choose one of:" in shown("except cnnlab.ConfigError")["stream"]

    runs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1  # the refused config left no directory
    summary = check_run_dir(runs[0], epochs=3, test_size=128)
    assert summary["model"] == "__main__.SimpleNN" and summary["config"]["model"]["kwargs"] == {"width": 8}
    sweeps = list((tmp_path / "outputs" / "sweeps").iterdir())
    assert len(sweeps) == 1 and json.loads((sweeps[0] / "0_lr-0.05" / "summary.json").read_text())["status"] == "completed"
