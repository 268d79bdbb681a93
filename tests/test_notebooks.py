"""The notebooks execute top to bottom, offline, on the venv's own kernel (slow: about a minute each)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def execute(name: str, tmp_path: Path, monkeypatch) -> list[str]:
    """Run notebooks/<name> in a fresh kernel with its outputs under tmp_path; return each code cell's text output.

    kernel_name "python3" is the venv's ipykernel: jupyter_client swaps the spec's bare `python` for
    sys.executable, and a last cell added here checks that (and that the repository's package is the one imported).
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys, rlhf_lightning; print(sys.executable); "
                                              "print(rlhf_lightning.__file__)"))
    monkeypatch.setenv("RLHF_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        text += "".join(o.get("data", {}).get("text/markdown", "") for o in cell.outputs if "data" in o)
        text += "<image>" * sum("image/png" in o.get("data", {}) for o in cell.outputs)
        outputs.append(text)
    executable, package = outputs[-1].split()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert Path(package).resolve().is_relative_to(REPO.resolve())
    assert list((tmp_path / "out").rglob("events.out.tfevents.*")), "the notebook wrote no TensorBoard run"
    return outputs


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, monkeypatch):
    text = "\n".join(execute("quickstart.ipynb", tmp_path, monkeypatch))
    before, after = map(float, re.search(r"before GRPO ([\d.]+) -> after GRPO ([\d.]+)", text).groups())
    assert after > before  # measured: 0.16 -> 0.50 on 300 held-out prompts
    assert "<image>" in text  # the reward curve
    assert "| prompt | completion | answer | reward | advantage |" in text  # the sample table
    sft, grpo, without = map(float, re.search(r"SFT with the calculator ([\d.]+), after GRPO with the calculator "
                                              r"([\d.]+), the same SFT model without it ([\d.]+)", text).groups())
    assert min(sft, grpo) > without + 0.5  # measured: 0.81, 0.85 with the tool; 0.00 without
    assert "<<tool: =" in text  # a conversation with the calculator's reply marked
    assert re.search(r"step rewards \[0\.0, (0|1)\.0\]", text) or "step rewards [1.0]" in text  # episodes played


@pytest.mark.slow
def test_custom_task_notebook(tmp_path, monkeypatch):
    text = "\n".join(execute("custom_task.ipynb", tmp_path, monkeypatch))
    assert "<image>" in text
    first, last = map(float, re.search(r"reward function: reward ([\d.]+) -> ([\d.]+)", text).groups())
    assert last > first
    first, last = map(float, re.search(r"subclass: reward ([\d.]+) -> ([\d.]+)", text).groups())
    assert last > first


def _requirement_names(specs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in specs}


@pytest.mark.parametrize("name", ["quickstart.ipynb", "custom_task.ipynb"])
def test_notebook_imports_are_installed_by_the_notebooks_extra(name):
    """`pip install -e ".[notebooks]"` gives every module a notebook imports (a plain install lacks matplotlib),
    and the notebook's first cell says so."""
    import importlib.metadata
    import json

    tomllib = pytest.importorskip("tomllib")  # the standard library's from Python 3.11

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installed = _requirement_names(project["dependencies"] + project["optional-dependencies"]["notebooks"])
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    modules = set(re.findall(r"^\s*(?:from|import) ([A-Za-z_]\w*)", code, flags=re.M))
    dists = importlib.metadata.packages_distributions()
    missing = {m: dists.get(m) for m in modules - set(sys.stdlib_module_names) - {"rlhf_lightning"}
               if not {d.lower().replace("_", "-") for d in dists.get(m, [m])} & installed}
    assert not missing, f"{name} imports modules that neither the dependencies nor [notebooks] install: {missing}"
    assert 'pip install -e \\".[notebooks]\\"' in json.dumps(cells[0]["source"]), "first cell must say how to install"
