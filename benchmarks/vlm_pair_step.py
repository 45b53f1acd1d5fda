"""A VLM2Vec pair step through GradCache against transformers' plain forward / backward of the same batch.

    python benchmarks/vlm_pair_step.py --threads 2                          # batch 32 pairs, chunks 4 8 16
    python benchmarks/vlm_pair_step.py --batch-size 8 --chunks 4 --rounds 1   # smoke run

One tiny Qwen2-VL (``configs/model/vlm_tiny_qwen2.yaml``'s config, random init, DoRA r 8 with Gaussian init as
VLM2Vec trains) in ``prompt_format: vlm2vec``; a batch of instruction pairs: text queries
(``instruction + caption``), image targets (``<|image_pad|>\\n`` + instruction, 96 x 48 images) and one hard
negative image per pair; ``pair_infonce`` at temperature 0.02, backward, AdamW step.

* ``transformers``: the peer, written against transformers only (no reid_lab encoder code): the processor
  on the whole batch's prompts, ``model(**inputs, output_hidden_states=True).hidden_states[-1]`` at the last
  token, normalised, one loss and one backward over one graph (what VLM2Vec does without GradCache).
* ``grad_cache(c)``: reid_lab's step: :func:`~reid_lab.modules.grad_cache.grad_cache_backward` over chunks of
  ``c`` pairs (their queries, targets and negatives) with :meth:`VLMEncoder.embed_items`.

Memory: on a GPU ``torch.cuda.max_memory_allocated`` over the step; on a CPU the peak bytes of the tensors
autograd holds for backward (``SavedBytes`` of ``vlm_grad_cache.py``). Time: the median step over rounds, modes
interleaved. Prints the load average: on a shared box the times move with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_grad_cache import WORDS, SavedBytes  # noqa: E402 - the benchmarks folder is not a package

from reid_lab.data.text.vlm_processor import build_offline_processor  # noqa: E402
from reid_lab.losses.image_text import pair_infonce  # noqa: E402
from reid_lab.models.vlm import VLMEncoder  # noqa: E402
from reid_lab.modules.grad_cache import grad_cache_backward  # noqa: E402
from reid_lab.modules.vlm import slice_pair_batch  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "vlm_tiny_qwen2.yaml"
LOGIT_SCALE = torch.tensor(50.0).log()
QUERY, TARGET = "Find the person described: ", "Represent the given person image: "


def _batch(size: int, seed: int, device: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (12,), generator=g)) for _ in range(size)]

    def side(n, instruction, text, images):
        return {"instruction": [instruction] * n, "text": text or [None] * n,
                "image": torch.randn(n, 3, 96, 48, generator=g).to(device), "has_image": torch.full((n,), images)}

    return {"query": side(size, QUERY, texts, False), "target": side(size, TARGET, None, True),
            "negatives": side(size, TARGET, None, True), "pid": torch.arange(size), "index": torch.arange(size)}


def _plain_reps(encoder: VLMEncoder, batch: dict) -> dict:
    """The peer: transformers' processor and model on the batch's VLM2Vec prompts, one graph."""
    out = {}
    for key in ("query", "target", "negatives"):
        side = batch[key]
        prompts = [("<|image_pad|>\n" if img else "") + ins + (text or "")
                   for ins, text, img in zip(side["instruction"], side["text"], side["has_image"].tolist())]
        images = side["image"][side["has_image"]]
        extra = {}
        if len(images):
            pixels = (images.float() * encoder.input_std + encoder.input_mean).clamp(0, 1).cpu()
            extra = {"images": list(pixels), "do_rescale": False}
        inputs = {k: v.to(side["image"].device)
                  for k, v in encoder.processor(text=prompts, return_tensors="pt", padding=True, **extra).items()}
        hidden = encoder.model(**inputs, output_hidden_states=True).hidden_states[-1]
        out[key] = F.normalize(hidden[:, -1], dim=-1)  # the processor pads on the left
    return out


def _loss(reps):
    return pair_infonce(reps["query"], reps["target"], reps["negatives"], LOGIT_SCALE), None


def step(encoder, optimizer, batch, chunk: int | None, meter: SavedBytes) -> tuple[float, float, float]:
    """One training step: (loss, seconds, peak MiB)."""
    cuda = batch["target"]["image"].is_cuda
    optimizer.zero_grad()
    meter.release()
    meter.peak = 0  # this step's peak only
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    if chunk is None:
        with meter.counting():
            loss, _ = _loss(_plain_reps(encoder, batch))
        loss.backward()
    else:
        chunk_peak = 0

        def backward(value):
            nonlocal chunk_peak
            value.backward()
            chunk_peak = max(chunk_peak, meter.peak)
            meter.release()

        def embed(part):
            return {k: encoder.embed_items(part[k]) for k in ("query", "target", "negatives")}

        with meter.counting():
            loss, _ = grad_cache_backward(batch, len(batch["pid"]), chunk, embed, _loss, backward=backward,
                                          slicer=slice_pair_batch)
        meter.peak = max(meter.peak, chunk_peak)
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else meter.peak
    meter.release()
    return float(loss.detach()), seconds, peak / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step (each with 1 hard negative)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=None, help="language model width (default: the config's 64)")
    parser.add_argument("--layers", type=int, default=None, help="language model layers (default: the config's 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["model_cfg"]
    if args.hidden:
        cfg["text_config"].update(hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                  num_attention_heads=8, num_key_value_heads=4,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "mrope_section": [args.hidden // 32] * 2 + [args.hidden // 16 -
                                                                                              2 * (args.hidden // 32)]})
        cfg["vision_config"]["hidden_size"] = args.hidden
    if args.layers:
        cfg["text_config"]["num_hidden_layers"] = args.layers
    with tempfile.TemporaryDirectory() as tmp:
        processor = build_offline_processor(Path(tmp) / "processor", WORDS * 20 + [QUERY, TARGET], vocab_size=320)
        torch.manual_seed(0)
        encoder = VLMEncoder(model_cfg=cfg, processor_path=str(processor), prompt_format="vlm2vec",
                             lora={"r": 8, "alpha": 32, "dropout": 0.0, "use_dora": True, "init": "gaussian"})
        encoder = encoder.to(args.device).train()
        params = sum(p.numel() for p in encoder.parameters())
        optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=0.0)  # lr 0: one state
        batch = _batch(args.batch_size, 0, args.device)
        meter = SavedBytes()
        modes = [None] + list(args.chunks)
        results = {m: [] for m in modes}
        losses = {m: step(encoder, optimizer, batch, m, meter)[0] for m in modes}  # warm-up; losses must agree
        for r in range(args.rounds):
            for m in (modes if r % 2 == 0 else modes[::-1]):
                results[m].append(step(encoder, optimizer, batch, m, meter))
    print(f"device {args.device}, threads {args.threads}, load average {os.getloadavg()}, "
          f"{params / 1e6:.2f} M parameters, batch {args.batch_size} pairs + {args.batch_size} negatives")
    full_s = statistics.median(s for _, s, _ in results[None])
    full_mb = max(mb for _, _, mb in results[None])
    print("| mode | step s | time vs transformers | peak MiB | memory vs transformers | first loss |")
    print("|---|---|---|---|---|---|")
    for m in modes:
        seconds, mb = statistics.median(s for _, s, _ in results[m]), max(mb for _, _, mb in results[m])
        name = "transformers (plain)" if m is None else f"grad_cache({m})"
        print(f"| {name} | {seconds:.3f} | {seconds / full_s:.2f}x | {mb:.1f} | {mb / full_mb:.2f}x | {losses[m]:.5f} |")


if __name__ == "__main__":
    main()
