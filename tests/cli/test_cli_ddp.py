"""Two processes (DDP over gloo, CPU) give the numbers of one: `reid-lab fit / test / predict` as a user runs them.

What "equal" means here: the same checkpoint evaluated by 2 ranks and by 1 process gives the same R1 / mAP /
mINP to the printed digits, and `predict`'s merged feature file holds the same items in the same order with the
same space record and features within 1e-5 (each rank runs the same kernels on the same images; only the
batch a row sits in can differ). Training is not compared number for number: with 2 ranks every step averages
the gradients of two different PK batches, a different optimisation path by design (as with any DDP run).

Before reid_lab.data.shard every rank evaluated the whole split and the metric gathered both copies: mAP 13.14
instead of 15.41 on this data, silently.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reid_lab.cli import main as cli_main
from reid_lab.data.shard import ShardedBatchSampler, shard_bounds
from reid_lab.embedding.features import FeatureSet, merge_feature_files, part_path

pytestmark = pytest.mark.slow

CONFIG = """
data:
  class_path: reid_lab.data.ReIDDataModule
  init_args: {{dataset: synthetic, root: {root}, image_size: [64, 32], batch_size: 16, eval_batch_size: 8,
              num_workers: 0}}
model:
  class_path: reid_lab.modules.ReIDModule
  init_args: {{backbone: resnet18, last_stride: 2}}
trainer: {{accelerator: cpu, use_distributed_sampler: false}}
"""


def _cli(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "reid_lab.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _devices(n: int) -> list[str]:
    return ["--trainer.devices", str(n), "--trainer.strategy", "ddp" if n > 1 else "auto"]


@pytest.fixture(scope="module")
def trained(tiny_synthetic, tmp_path_factory):
    """A checkpoint from a real 2-process `fit` (1 epoch, validation under DDP on the held-out ids)."""
    work = tmp_path_factory.mktemp("ddp")
    config = work / "config.yaml"
    config.write_text(CONFIG.format(root=tiny_synthetic))
    out = _cli(["fit", "--config", str(config), *_devices(2), "--trainer.max_epochs", "1",
                "--trainer.default_root_dir", str(work), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                "--trainer.logger.save_dir", str(work)], work)
    ckpt = next(work.rglob("last.ckpt"), None)
    assert ckpt is not None, out[-2000:]
    return work, config, ckpt


def _test_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("[test")]
    assert len(lines) == 1, output[-2000:]  # printed once (rank 0), not once per rank
    return re.sub(r"^\[test[^\]]*\]", "", lines[0])


def _in_process(args: list[str], capsys) -> str:
    """One process: the same CLI, run here (saves a process start; the 2-rank runs need their own)."""
    capsys.readouterr()
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    return captured.out + captured.err


def test_test_metrics_of_two_ranks_equal_one_process(trained, cli_argv, capsys):
    work, config, ckpt = trained
    base = ["test", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.logger", "false",
            "--trainer.callbacks", "[]"]
    one = _test_line(_in_process([*base, *_devices(1)], capsys))
    two = _test_line(_cli([*base, *_devices(2)], work))
    assert "mAP" in one and one == two


def test_predict_parts_merge_into_the_one_process_file(trained, cli_argv, capsys):
    work, config, ckpt = trained
    base = ["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.logger", "false",
            "--trainer.callbacks", "[]"]
    _in_process([*base, *_devices(1), "--predict_writer.output", str(work / "one.pt")], capsys)
    out = _cli([*base, *_devices(2), "--predict_writer.output", str(work / "two.pt")], work)
    assert "merged 2 parts" in out
    one, two = FeatureSet.load(work / "one.pt"), FeatureSet.load(work / "two.pt")
    assert two.items == one.items and two.space == one.space and two.space.get("space_id")
    assert torch.equal(two.pids, one.pids) and torch.equal(two.is_query, one.is_query)
    assert torch.equal(two.camids, one.camids)
    torch.testing.assert_close(two.features, one.features, atol=1e-5, rtol=0)
    parts = [part_path(work / "two.pt", r, 2) for r in range(2)]
    assert all(p.is_file() for p in parts)
    sizes = [len(FeatureSet.load(p).items) for p in parts]
    assert sum(sizes) == len(one.items) and min(sizes) > 0
    # the merge CLI rebuilds the same file from the parts; a missing rank is refused
    assert cli_main(["merge-features", *map(str, parts), "--out", str(work / "merged.pt")]) == 0
    assert FeatureSet.load(work / "merged.pt").items == one.items
    with pytest.raises(ValueError, match=r"ranks \[1\] of 2 are missing"):
        merge_feature_files(parts[:1])


@pytest.mark.parametrize("num_batches,world", [(7, 2), (8, 3), (2, 4), (0, 2)])
def test_shards_are_contiguous_disjoint_and_complete(num_batches, world):
    batches = [[2 * i, 2 * i + 1] for i in range(num_batches)]
    shards = [list(ShardedBatchSampler(batches, num_replicas=world, rank=r)) for r in range(world)]
    assert [b for shard in shards for b in shard] == batches  # rank order restores the one-process order
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(ShardedBatchSampler(batches, world, r)) for r in range(world)] == list(map(len, shards))
    assert shard_bounds(10, 2, 3) == (7, 10)
