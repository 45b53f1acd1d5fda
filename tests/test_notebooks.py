"""The notebooks run top to bottom on small settings (their parameters cell is overridden): the dataset explorer
on a tiny synthetic set, the ranked-list viewer, the study explorer and the embedding view on a tiny real
upgrade study (two 2-batch ResNet-18 trainings through `reid-lab upgrade`)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def tiny_study(tiny_synthetic, tmp_path_factory):
    from reid_lab.cli import main

    tmp = tmp_path_factory.mktemp("nb_study")
    tiny = {"data.init_args.root": str(tiny_synthetic), "data.init_args.image_size": [64, 32],
            "data.init_args.batch_size": 8, "data.init_args.eval_batch_size": 64, "data.init_args.num_workers": 0,
            "trainer.max_epochs": 1, "trainer.check_val_every_n_epoch": 1, "trainer.limit_train_batches": 2,
            "trainer.accelerator": "cpu"}
    config = {"study": {
        "name": "nb_study", "out": str(tmp / "study"),
        "configs": [str(REPO / "configs/data/synthetic.yaml"), str(REPO / "configs/trainer/cpu_demo.yaml")],
        "scenario": {"kind": "extended_class", "old_fraction": 0.5, "seed": 0},
        "old": {"configs": [str(REPO / "configs/model/bot_r18.yaml")], "overrides": tiny},
        "new": {"configs": [str(REPO / "configs/model/bot_r18.yaml")], "overrides": tiny},
        "methods": {"bct": {"compatible_losses": [{"name": "bct"}]}},
        "evaluation": {"orderings": ["random"], "ratios": [0, 0.5, 1.0]},
        "logger": "none",
    }}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["upgrade", "--config", str(path)]) == 0
    return tmp / "study"


def _parameters(name: str, tmp_path: Path, tiny_synthetic: Path, request) -> str:
    if name == "explore_synthetic_upgrade":
        return f'DATA = "{tmp_path / "synthetic"}"\nNUM_IDS = 16\nNUM_CAMERAS = 3'
    if name == "dataset_explorer":
        return f'DATA = "{tiny_synthetic}"\nDATASET = "synthetic"\nIDS_SHOWN = 3\nIMAGES_PER_ID = 4'
    study = request.getfixturevalue("tiny_study")
    if name == "ranked_lists":
        return f'FEATURES = "{study / "features" / "bct.pt"}"\nWORST = 3\nTOP_K = 5'
    return f'STUDY = "{study}"\nMETHOD = "bct"\n' + ("FLIPS_SHOWN = 2" if "study" in name else "IDS_SHOWN = 5")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, tiny_synthetic, request, cli_argv):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name}: commit it cleared"
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert params, f"{path.name} needs a cell tagged 'parameters'"
    params[0].source = _parameters(path.stem, tmp_path, tiny_synthetic, request)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no figure inline"


def test_relative_paths_are_the_repositorys_whatever_folder_the_kernel_starts_in(tiny_synthetic, cli_argv):
    """The README's paths (`data/synthetic`, `reports/...`) are relative to the repository: a kernel started in
    notebooks/ (Jupyter's default) must find them. The tiny dataset is given relative to the repository root, so
    it is found only if the notebook resolves it from there, not from the kernel's folder."""
    import os

    nb = nbformat.read(REPO / "notebooks" / "dataset_explorer.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    params.source = (f'DATA = "{os.path.relpath(tiny_synthetic, REPO)}"\nDATASET = "synthetic"\n'
                     "IDS_SHOWN = 2\nIMAGES_PER_ID = 2")
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "train" in printed and "no dataset at" not in printed
