"""Dotted command-line overrides into `dataset_options` arrive typed (issue: `num_query_per_id 2` used to reach
folder.py as the string "2" and fail with `'<' not supported between 'str' and 'int'`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from reid_lab.lightning_cli import run_lightning_cli
from tests.studies.test_study import _folder_from_synthetic

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dotted_folder_options_are_typed_end_to_end(tiny_synthetic, tmp_path, cli_argv):
    root = tmp_path / "folder"
    _folder_from_synthetic(tiny_synthetic, root)
    cli = run_lightning_cli([
        "--config", str(REPO / "configs/data/folder.yaml"), "--config", str(REPO / "configs/model/bot_r18.yaml"),
        f"--data.init_args.root={root}", "--data.init_args.num_workers=0",
        "--data.init_args.dataset_options.num_query_per_id", "2",
        "--data.init_args.dataset_options.train_fraction", "0.5",
        "--data.init_args.dataset_options.camera_regex", "_c(?P<cam>\\d+)s",
        "--trainer.logger=false", "--trainer.callbacks=[]",
    ], run=False)
    options = cli.datamodule.dataset_options
    assert options["num_query_per_id"] == 2 and isinstance(options["num_query_per_id"], int)
    assert options["train_fraction"] == 0.5 and options["camera_regex"] == "_c(?P<cam>\\d+)s"
    cli.datamodule.setup("test")
    per_id = Counter(r.pid for r in cli.datamodule.splits.query)
    assert per_id and set(per_id.values()) == {2}
