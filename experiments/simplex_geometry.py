"""How far a d-Simplex study's models are from the stationary regime CoReS relies on (docs/results.md).

For the old model and one new method of a study trained with ``classifier: simplex``
(``experiments/synthetic_arch_simplex.yaml``), on training images of the old identities and on test queries:

* vertex accuracy: the share of the old identities' training images whose logits pick their identity's vertex;
* the mean cosine between a feature and its identity's vertex;
* the mean cosine between the old and the new feature of the same image;
* the share of a feature's energy (squared norm) inside the span of the old identities' vertices.

    python experiments/simplex_geometry.py reports/synthetic_arch_simplex simplex_seed0 --root data/synthetic
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from reid_lab.data.datasets import load_dataset
from reid_lab.data.transforms import build_test_transform
from reid_lab.embedding.checkpoint import load_encoder


def span_share(features: torch.Tensor, vertices: torch.Tensor) -> float:
    """Mean over rows of ``|P x|^2 / |x|^2``, ``P`` the orthogonal projector onto the rows of ``vertices``."""
    basis, _ = torch.linalg.qr(vertices.T.double())
    x = features.double()
    return float(((x @ basis).norm(dim=1) ** 2 / x.norm(dim=1) ** 2).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_out", type=Path)
    parser.add_argument("method", help="a trained method of the study (its train/<method>/done.json)")
    parser.add_argument("--root", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--image-size", type=int, nargs=2, default=(96, 48))
    parser.add_argument("--images", type=int, default=400, help="training images and test queries, each")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    def encoder(version: str):
        done = args.study_out / "train" / version / "done.json"
        if not done.is_file():
            raise SystemExit(f"simplex_geometry: {done} does not exist (train the study first)")
        model, checkpoint = load_encoder(json.loads(done.read_text())["checkpoint"])
        if getattr(model.head, "simplex", None) is None:
            raise SystemExit(f"simplex_geometry: {version} was not trained with classifier: simplex")
        return model.eval(), checkpoint["state_dict"]["class_identity"]

    old, old_ids = encoder("old")
    new, _ = encoder(args.method)
    vertices = old.head.simplex
    if not torch.equal(vertices, new.head.simplex):
        raise SystemExit("simplex_geometry: the old and new models do not share their simplex (K or d differ)")
    dataset = load_dataset(args.dataset, args.root)
    old_paths = set(json.loads((args.study_out / "split" / "old.json").read_text())["paths"])
    train = [r for r in dataset.train if r.path in old_paths][: args.images]
    test = list(dataset.query)[: args.images]
    transform = build_test_transform(tuple(args.image_size))

    def embed(model, records):
        images = torch.stack([transform(Image.open(r.path).convert("RGB")) for r in records])
        with torch.no_grad():
            out = model(images)
        return out["embedding"], out["logits"]

    identity = torch.tensor([r.pid for r in train])
    rows = []
    for name, model in (("old", old), (args.method, new)):
        feats, logits = embed(model, train)
        test_feats, _ = embed(model, test)
        rows.append((name, float((logits.argmax(1) == identity).float().mean()),
                     float(F.cosine_similarity(feats, vertices[identity]).mean()),
                     span_share(feats, vertices[old_ids]), span_share(test_feats, vertices[old_ids])))
    print(f"{len(train)} training images of the old identities, {len(test)} test queries; K = "
          f"{vertices.shape[0]}, d = {vertices.shape[1]}, {old_ids.numel()} old identities")
    print("| model | vertex accuracy (train) | cos to own vertex (train) | energy in old-vertex span (train) | "
          "(test) |\n|---|---|---|---|---|")
    for name, acc, cos, share_train, share_test in rows:
        print(f"| {name} | {acc:.1%} | {cos:.3f} | {share_train:.1%} | {share_test:.1%} |")
    same_train = F.cosine_similarity(embed(old, train)[0], embed(new, train)[0]).mean()
    same_test = F.cosine_similarity(embed(old, test)[0], embed(new, test)[0]).mean()
    print(f"same image, cos(old, new): training {float(same_train):.3f}, test {float(same_test):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
