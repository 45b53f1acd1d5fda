"""A short fine-tuning probe: a plain PyTorch loop over a ReID module's ``training_output`` on the synthetic
set, with the full test split evaluated (R1 / mAP, eval mode) every ``--eval-every`` steps.

Used to diagnose why an ImageNet backbone fine-tunes slowly (docs/trials.md):

    python experiments/finetune_probe.py mobilenet_v2 --lr 1e-3 --steps 40
    python experiments/finetune_probe.py timm:tf_efficientnet_lite0 --lr 1e-3 --steps 80
    python experiments/finetune_probe.py timm:tf_efficientnet_lite0 --lr 0 --steps 40          # BN statistics only
    python experiments/finetune_probe.py timm:tf_efficientnet_lite0 --lr 1e-4 --frozen-bn --steps 40
    python experiments/finetune_probe.py timm:tf_efficientnet_lite0 --steps 80 --no-last-activation
    python experiments/finetune_probe.py timm:tf_efficientnet_lite0 --steps 80 --optimizer sgd --lr 0.03 --precise-bn 40

Batches of 8 identities x 4 images at 96 x 48 (padding 6), CE (label smoothing 0.1) + triplet (margin 0.3),
Adam (or SGD with momentum 0.9, ``--optimizer sgd``) with weight decay 5e-4 at a constant learning rate, seed 0.
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import numpy as np
import torch
from torch import nn

from reid_lab.data.datamodule import ReIDDataModule
from reid_lab.metrics.rank import evaluate_rank
from reid_lab.modules.reid import ReIDModule


def evaluate(module: ReIDModule, datamodule: ReIDDataModule) -> tuple[float, float]:
    """R1 and mAP in percent on the test split (cosine distance, ReID protocol)."""
    module.eval()
    feats, pids, camids, is_query = [], [], [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            feats.append(nn.functional.normalize(module.model(batch["image"])["embedding"], dim=1))
            pids.append(batch["pid"])
            camids.append(batch["camid"])
            is_query.append(batch["is_query"])
    f, p, c, q = torch.cat(feats), torch.cat(pids), torch.cat(camids), torch.cat(is_query).bool()
    result = evaluate_rank(1 - f[q] @ f[~q].T, p[q], p[~q], c[q], c[~q])
    return round(100 * float(result.cmc[0]), 1), round(100 * float(result.mAP), 1)


def zero_fraction(module: ReIDModule, images: torch.Tensor) -> float:
    """Fraction of exact zeros in the backbone's output map (eval mode): the share of ReLU6 outputs that pass
    no gradient."""
    module.eval()
    x = images
    if module.model.renormalize:
        x = x * module.model._renorm_scale + module.model._renorm_shift
    with torch.no_grad():
        return float((module.model.backbone(x) == 0).float().mean())


def precise_bn(module: ReIDModule, datamodule: ReIDDataModule, batches: int) -> ReIDModule:
    """A copy of ``module`` whose BatchNorm running statistics are the plain average over ``batches`` training
    batches at the current weights (fast-reid's PreciseBN), instead of the exponential average of the run."""
    clone = copy.deepcopy(module)
    norms = [m for m in clone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    clone.train()
    with torch.no_grad():
        for i, batch in enumerate(datamodule.train_dataloader()):
            if i == batches:
                break
            clone.model(batch["image"])
    return clone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone")
    parser.add_argument("--root", default="data/synthetic")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--frozen-bn", action="store_true", help="backbone BatchNorm in eval mode (ImageNet stats)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="sgd: momentum 0.9")
    parser.add_argument("--precise-bn", type=int, default=0, metavar="N",
                        help="also evaluate with BatchNorm statistics re-estimated over N training batches")
    parser.add_argument("--no-last-activation", action="store_true",
                        help="pool the backbone's map before its last activation (last_activation=False)")
    parser.add_argument("--last-stride", type=int, choices=(1, 2), default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dm = ReIDDataModule(dataset="synthetic", root=args.root, image_size=[96, 48], padding=6, batch_size=32,
                        num_workers=0)
    dm.setup("fit")
    dm.setup("test")
    module = ReIDModule(backbone=args.backbone, pretrained="imagenet", last_stride=args.last_stride,
                        num_classes=dm.num_classes, last_activation=not args.no_last_activation,
                        losses=[{"name": "ce", "epsilon": 0.1}, {"name": "triplet", "margin": 0.3}])
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(module.parameters(), lr=args.lr, weight_decay=5e-4)
    else:
        optimizer = torch.optim.SGD(module.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)

    def train_mode() -> None:
        module.train()
        if args.frozen_bn:
            for m in module.model.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()

    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()  # the training batches stay as they were
    first = next(iter(dm.train_dataloader()))["image"]
    torch.set_rng_state(rng[0]), random.setstate(rng[1]), np.random.set_state(rng[2])
    print(f"{args.backbone}: {zero_fraction(module, first):.0%} of the backbone map's values are 0", flush=True)
    print(f"{args.backbone} step 0: R1 / mAP {evaluate(module, dm)}", flush=True)
    train_mode()
    batches, start = iter(dm.train_dataloader()), time.time()
    for step in range(1, args.steps + 1):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(dm.train_dataloader())
            batch = next(batches)
        out = module.training_output(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % 10 == 0:
            parts = {k: round(float(v), 3) for k, v in out.parts.items()}
            print(f"step {step}: {parts} ({time.time() - start:.0f} s)", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            print(f"{args.backbone} step {step}: R1 / mAP {evaluate(module, dm)}", flush=True)
            if args.precise_bn:
                print(f"  with precise BatchNorm ({args.precise_bn} batches): R1 / mAP "
                      f"{evaluate(precise_bn(module, dm, args.precise_bn), dm)}", flush=True)
            train_mode()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
