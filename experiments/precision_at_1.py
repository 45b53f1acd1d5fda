"""MMEB-style Precision@1 of saved query and gallery features (from `reid-lab predict`), next to R1 / mAP.

    reid-lab predict --config <cfg> --ckpt_path <ckpt> --data.init_args.predict_modality text --predict_writer.output q.pt
    reid-lab predict --config <cfg> --ckpt_path <ckpt> --data.init_args.predict_modality image --predict_writer.output g.pt
    python experiments/precision_at_1.py q.pt g.pt --candidates 100

Each query gets one positive (a gallery item of its identity) and K - 1 negatives, drawn with --seed; chance is
1 / K. Both files must come from the same embedding space.
"""

from __future__ import annotations

import argparse

import torch

from reid_lab.embedding.features import FeatureSet
from reid_lab.metrics.candidates import candidate_lists, precision_at_1
from reid_lab.metrics.rank import evaluate_rank


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("query")
    parser.add_argument("gallery")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    query, gallery = FeatureSet.load(args.query), FeatureSet.load(args.gallery)
    if query.space.get("space_id") != gallery.space.get("space_id"):
        raise SystemExit(f"{args.query} and {args.gallery} come from different embedding spaces "
                         f"({query.space.get('space_id')} vs {gallery.space.get('space_id')})")
    q = torch.nn.functional.normalize(query.features.float(), dim=1)
    g = torch.nn.functional.normalize(gallery.features.float(), dim=1)
    dist = 1 - q @ g.T
    lists = candidate_lists(query.pids, gallery.pids, args.candidates, seed=args.seed)
    p1 = precision_at_1(dist, lists)
    rank = evaluate_rank(dist.numpy(), query.pids.numpy(), gallery.pids.numpy())
    print(f"{len(query.pids)} queries, {len(gallery.pids)} gallery items, {args.candidates} candidates each")
    print(f"P@1 {100 * p1:.2f}  (chance {100 / args.candidates:.2f})  R1 {100 * rank.cmc[0]:.2f}  "
          f"mAP {100 * rank.mAP:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
