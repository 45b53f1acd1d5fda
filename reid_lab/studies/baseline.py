"""``reid-lab baseline``: the first numbers on a dataset, before training anything.

    reid-lab baseline --config configs/data/folder.yaml --root data/my_folder
    reid-lab baseline --config configs/data/market1501.yaml --backbone mobilenet_v2 --pretrained imagenet

Two references per dataset, on its test query / gallery under the ReID protocol (same-identity same-camera
gallery items removed), as ranking numbers (R1 / R5 / R10 / mAP / mINP) and as verification numbers (TPR at
FPR 1e-3 and 1e-2 over genuine / impostor query-gallery pairs, :mod:`reid_lab.metrics.verification`):

* **raw pixels**: the images resized to the data config's ``image_size``, flattened, compared by cosine
  distance (:mod:`reid_lab.studies.raw_pixels`). A model that does not beat this learned the camera, not the
  person.
* **an untrained backbone** (``--backbone``, optionally ``--pretrained imagenet`` from an installed package):
  globally average-pooled features of the evaluation transform, cosine distance. With ImageNet weights this
  is the number fine-tuning has to beat.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from reid_lab.data.datamodule import ReIDDataModule
from reid_lab.data.options import typed_options
from reid_lab.metrics import compute_distance, evaluate_rank
from reid_lab.metrics.verification import tpr_at_fpr, verification_pairs
from reid_lab.models.backbones import build_backbone
from reid_lab.studies.raw_pixels import pixel_features


def _datamodule(config: str, root: str | None, batch_size: int) -> ReIDDataModule:
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"data config {config} does not exist")
    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    if not str(data.get("class_path", "ReIDDataModule")).endswith("ReIDDataModule"):
        raise ValueError(f"{config}: the baseline ranks image queries; expected a ReIDDataModule config, got "
                         f"{data.get('class_path')!r}")
    args = dict(data.get("init_args") or {})
    if root is not None:
        args["root"] = root
    keep = {"dataset", "root", "dataset_options", "image_size"}
    args = {k: v for k, v in args.items() if k in keep}
    args["dataset_options"] = typed_options(args.get("dataset_options"))
    return ReIDDataModule(**args, eval_batch_size=batch_size, num_workers=0, check_images=False)


def _metrics(q, g, dm: ReIDDataModule) -> dict[str, float]:
    queries, gallery = dm.splits.query, dm.splits.gallery
    pids = [torch.tensor([r.pid for r in rs]) for rs in (queries, gallery)]
    camids = [torch.tensor([r.camid for r in rs]) for rs in (queries, gallery)]
    distance = compute_distance(q, g, metric="cosine")
    result = evaluate_rank(distance, pids[0], pids[1], camids[0], camids[1]).summary()
    genuine, impostor = verification_pairs(1 - torch.as_tensor(distance), pids[0], pids[1], camids[0], camids[1])
    for fpr, tpr in tpr_at_fpr(genuine, impostor, (1e-3, 1e-2)).items():
        result[f"TPR@{fpr:g}"] = 100 * tpr
    return result


@torch.no_grad()
def backbone_features(dm: ReIDDataModule, backbone: str, pretrained: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pooled features ``(Q, C)``, ``(G, C)`` of the test query and gallery under the evaluation transform."""
    net = build_backbone(backbone, pretrained=pretrained).eval()
    rows, flags = [], []
    for batch in dm.test_dataloader():
        out = net(batch["image"])
        rows.append(out.mean(dim=(2, 3)) if net.is_spatial else out.flatten(1))
        flags.append(batch["is_query"].bool())
    features, is_query = torch.cat(rows), torch.cat(flags)
    return features[is_query], features[~is_query]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reid-lab baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a data config (configs/data/*.yaml, a ReIDDataModule)")
    parser.add_argument("--root", default=None, help="override data.init_args.root")
    parser.add_argument("--backbone", default=None, help="also rank untrained backbone features (e.g. mobilenet_v2)")
    parser.add_argument("--pretrained", default=None, help="imagenet: the backbone's weights from a package")
    parser.add_argument("--batch-size", type=int, default=128, help="images per embedding batch (default: 128)")
    args = parser.parse_args(argv)
    try:
        dm = _datamodule(args.config, args.root, args.batch_size)
        size = tuple(dm.image_size)
        rows = {"raw pixels": _metrics(pixel_features(dm.splits.query, size), pixel_features(dm.splits.gallery, size),
                                       dm)}
        if args.backbone:
            name = f"{args.backbone} ({args.pretrained or 'random init'})"
            rows[name] = _metrics(*backbone_features(dm, args.backbone, args.pretrained), dm)
    except (FileNotFoundError, ValueError) as err:
        print(f"reid-lab baseline: {err}", file=sys.stderr)
        return 2
    print(f"{dm.splits.name}: {len(dm.splits.query)} queries, {len(dm.splits.gallery)} gallery images, "
          f"{size[0]}x{size[1]}")
    keys = list(next(iter(rows.values())))
    print(f"{'features':<32}" + "".join(f"{k:>11}" for k in keys))
    for name, metrics in rows.items():
        print(f"{name:<32}" + "".join(f"{metrics[k]:>11.2f}" for k in keys))
    return 0
