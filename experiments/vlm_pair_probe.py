"""A short training probe of a VLM2Vec-style embedder on instruction pairs: a plain PyTorch loop over the module's
``training_output`` (no GradCache: the same gradients), printing the loss and how far apart the embeddings are,
then Precision@1 per pair kind on the first test batches.

Used to find why a randomly initialised tiny Qwen2-VL did not learn (docs/trials.md):

    python experiments/vlm_pair_probe.py --kind caption_to_person --steps 40                      # collapses
    python experiments/vlm_pair_probe.py --kind caption_to_person --steps 150 --init-std 0.1      # images collapse
    python experiments/vlm_pair_probe.py --steps 600 --init-std 0.1 --pooling mean                # learns

The model is the one of ``--config`` (default ``configs/experiments/synthetic_vlm_pairs.yaml``) with
``--pooling`` and ``--init-std`` (``initializer_range`` of the text and vision configs) applied on top; the
pairs are that config's, optionally only one kind. AdamW at a constant learning rate, batches of 32, seed 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import Counter
from pathlib import Path

import torch
import yaml
from torch.nn.functional import normalize

from reid_lab.data.pair_datamodule import PairDataModule
from reid_lab.data.pairs import INSTRUCTIONS
from reid_lab.modules.vlm import VLMEmbeddingModule

KINDS = {"caption_to_person": INSTRUCTIONS["caption"], "person_to_person": INSTRUCTIONS["person_query"],
         "person_to_caption": INSTRUCTIONS["describe"]}


def mean_cosine(x: torch.Tensor) -> float:
    """Mean pairwise cosine of the rows of ``(B, D)`` (1.0: all rows point the same way)."""
    x = normalize(x.detach(), dim=1)
    return float((x @ x.T).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/experiments/synthetic_vlm_pairs.yaml")
    parser.add_argument("--kind", choices=sorted(KINDS), default=None, help="train on one pair kind only")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pooling", choices=("last", "mean"), default="last")
    parser.add_argument("--init-std", type=float, default=0.02)
    parser.add_argument("--eval-batches", type=int, default=8, help="test batches of 64 queries scored at the end")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = yaml.safe_load(Path(args.config).read_text())
    init = copy.deepcopy(cfg["model"]["init_args"])
    init.pop("grad_cache_chunk", None)
    init.update(pooling=args.pooling, lr=args.lr)
    for sub in ("text_config", "vision_config"):
        init["model_cfg"][sub]["initializer_range"] = args.init_std
    module = VLMEmbeddingModule(**init)
    data = dict(cfg["data"]["init_args"], batch_size=32, num_workers=0)
    if args.kind is not None:
        pairs = Path(data["train_pairs"])
        kept = [line for line in pairs.read_text().splitlines()
                if json.loads(line)["query"]["instruction"] == KINDS[args.kind]]
        subset = pairs.with_name(f"{pairs.stem}.{args.kind}.jsonl")  # next to the original: same image paths
        subset.write_text("\n".join(kept) + "\n")
        data["train_pairs"] = str(subset)
    dm = PairDataModule(**data)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=0.01)
    batches, start = iter(dm.train_dataloader()), time.time()
    for step in range(1, args.steps + 1):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(dm.train_dataloader())
            batch = next(batches)
        module.train()
        out = module.training_output(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % 10 == 0:
            q, t = out.embeddings["query"], out.embeddings["target"]
            print(f"step {step}: loss {out.loss.item():.3f}  mean cosine query-query {mean_cosine(q):.3f} "
                  f"target-target {mean_cosine(t):.3f}  ({time.time() - start:.0f} s)", flush=True)
    module.eval()
    queries, hits = Counter(), Counter()
    with torch.no_grad():
        for i, batch in enumerate(dm.test_dataloader()):
            if i >= args.eval_batches:
                break
            reps = {k: normalize(v.float(), dim=1) for k, v in module.embed_training(batch).items()}
            q, t = reps["query"], reps["target"]
            n = reps["negatives"].view(q.shape[0], -1, q.shape[1])
            hit = (q * t).sum(1) > torch.einsum("bd,bkd->bk", q, n).max(1).values
            for instruction, h in zip(batch["query"]["instruction"], hit.tolist()):
                queries[instruction] += 1
                hits[instruction] += int(h)
    for name, instruction in KINDS.items():
        if queries[instruction]:
            print(f"P@1 {name}: {100 * hits[instruction] / queries[instruction]:.1f} "
                  f"over {queries[instruction]} queries")
    print(f"P@1 all: {100 * sum(hits.values()) / max(sum(queries.values()), 1):.1f} "
          f"over {sum(queries.values())} queries (chance {100 / (n.shape[1] + 1):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
