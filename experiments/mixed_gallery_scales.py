"""Why a compatible model's backfill curve dips when the first part of the gallery is refreshed.

    python experiments/mixed_gallery_scales.py reports/synthetic_upgrade bct ract

During hot refresh the gallery mixes old-model and new-model features, and one ranking compares a new query's
similarity to both. If new -> new similarities sit on a larger scale than new -> old ones (compatible losses
pull the new model towards the old space but do not equalise the scales), refreshed *negatives* overtake
positives that are still old features. For every method, this prints the mean cosine similarity of valid
positives (same identity, other camera) and negatives in both cases, and for sampled queries the probability
that a refreshed negative outranks an old positive against that of an old negative doing so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from reid_lab.embedding.features import FeatureSet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a finished study's output folder (holds features/)")
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--queries", type=int, default=2000, help="sampled queries for the outranking rates")
    args = parser.parse_args(argv)
    old_q, old_g = FeatureSet.load(args.study / "features" / "old.pt").split()
    go = torch.nn.functional.normalize(old_g.features, dim=1)
    print(f"{'method':<12}{'new->new pos':>14}{'neg':>8}{'new->old pos':>14}{'neg':>8}"
          f"{'P(new neg > old pos)':>23}{'P(old neg > old pos)':>23}")
    for method in args.methods:
        new_q, new_g = FeatureSet.load(args.study / "features" / f"{method}.pt").split()
        q = torch.nn.functional.normalize(new_q.features, dim=1)
        gn = torch.nn.functional.normalize(new_g.features, dim=1)
        same = new_q.pids.view(-1, 1) == new_g.pids.view(1, -1)
        positive = same & (new_q.camids.view(-1, 1) != new_g.camids.view(1, -1))
        s_nn, s_no = q @ gn.T, q @ go.T
        rows = torch.randperm(len(q), generator=torch.Generator().manual_seed(0))[:args.queries]
        fresh, stale, counted = 0.0, 0.0, 0
        for i in rows.tolist():
            pos, neg = positive[i].nonzero().flatten(), (~same[i]).nonzero().flatten()
            if len(pos) == 0:
                continue
            fresh += float((s_nn[i, neg].view(-1, 1) > s_no[i, pos].view(1, -1)).float().mean())
            stale += float((s_no[i, neg].view(-1, 1) > s_no[i, pos].view(1, -1)).float().mean())
            counted += 1
        print(f"{method:<12}{float(s_nn[positive].mean()):>14.3f}{float(s_nn[~same].mean()):>8.3f}"
              f"{float(s_no[positive].mean()):>14.3f}{float(s_no[~same].mean()):>8.3f}"
              f"{fresh / counted:>23.3f}{stale / counted:>23.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
