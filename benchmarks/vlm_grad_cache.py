"""GradCache against the full batch: activation memory and step time at the same contrastive batch size.

    python benchmarks/vlm_grad_cache.py --threads 2                   # batch 64, chunks of 8 and 16, 3 rounds
    python benchmarks/vlm_grad_cache.py --batch-size 8 --chunks 4 --rounds 1 --steps 1   # smoke run

Both modes compute the same training step of the same VLM embedder (the Qwen2-VL config of
``configs/model/vlm_tiny_qwen2.yaml`` read at run time, random init, LoRA r=8 with dropout 0.1) on the same
batch of captions and 96 x 48 images: caption -> image InfoNCE at temperature 0.02, backward, AdamW step.

* ``full``: the plain PyTorch step: embed the whole batch with a graph, one loss, one backward.
* ``grad_cache(c)``: :func:`reid_lab.modules.grad_cache.grad_cache_backward` with chunks of ``c`` items.

Memory: on a GPU, ``torch.cuda.max_memory_allocated`` over the step (minus what is allocated before it). On a
CPU, where the allocator keeps no peak, the bytes of the tensors autograd holds for backward at the largest
moment (``torch.autograd.graph.saved_tensors_hooks`` counts each saved tensor's storage once while its graph
lives): that is the activation memory GradCache bounds by one chunk's. Time: the median step over the rounds;
the target is GradCache at most 1.4x the full batch's step time (one extra forward pass per step).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from reid_lab.data.text.vlm_processor import build_offline_processor
from reid_lab.losses.image_text import InfoNCELoss
from reid_lab.models.vlm import VLMEncoder
from reid_lab.modules.grad_cache import grad_cache_backward

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "vlm_tiny_qwen2.yaml"
WORDS = ["a", "man", "woman", "in", "red", "blue", "coat", "jacket", "with", "black", "shoes", "bag", "walking"]


class SavedBytes:
    """Bytes of the tensors autograd saves for backward, counted while alive; ``peak`` is the maximum."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.peak = 0

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.live:
            self.live[key] = storage.nbytes()
            self.peak = max(self.peak, sum(self.live.values()))
        return (key, tensor)

    def _unpack(self, packed):
        return packed[1]

    @contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def release(self) -> None:
        self.live.clear()


def _batch(processor: Path, encoder: VLMEncoder, size: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (12,), generator=g)) for _ in range(size)]
    return {"image": torch.randn(size, 3, 96, 48, generator=g), "text": encoder.tokenizer()(texts),
            "pid": torch.arange(size)}


def _embed(encoder):
    return lambda chunk: {"image": encoder.encode_image(chunk["image"]), "text": encoder.encode_text(chunk["text"])}


LOGIT_SCALE = torch.tensor(50.0).log()  # temperature 0.02


def _loss(reps):
    return InfoNCELoss()(reps["image"], reps["text"], None, LOGIT_SCALE), None


def step(encoder, optimizer, batch, chunk: int | None, meter: SavedBytes) -> float:
    """One training step; returns its loss."""
    optimizer.zero_grad()
    meter.release()
    if chunk is None:
        with meter.counting():
            loss, _ = _loss(_embed(encoder)(batch))
        loss.backward()
    else:
        chunk_peak = 0

        def backward(value):
            nonlocal chunk_peak
            value.backward()
            chunk_peak = max(chunk_peak, meter.peak)
            meter.release()

        with meter.counting():
            loss, _ = grad_cache_backward(batch, len(batch["pid"]), chunk, _embed(encoder), _loss, backward=backward)
        meter.peak = max(meter.peak, chunk_peak)
    meter.release()
    optimizer.step()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=None, help="language model width (default: the config's 64)")
    parser.add_argument("--layers", type=int, default=None, help="language model layers (default: the config's 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_cfg = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["model_cfg"]
    text, vision = model_cfg["text_config"], model_cfg["vision_config"]
    if args.hidden:  # 4 heads; the multimodal rotary sections must sum to head_dim / 2
        half = args.hidden // text["num_attention_heads"] // 2
        text.update(hidden_size=args.hidden, intermediate_size=2 * args.hidden)
        text["rope_parameters"]["mrope_section"] = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        vision["hidden_size"] = args.hidden  # the vision merger projects into the language model's width
    if args.layers:
        text["num_hidden_layers"] = args.layers
    with tempfile.TemporaryDirectory() as tmp:
        processor = build_offline_processor(Path(tmp) / "processor", [" ".join(WORDS)] * 8, vocab_size=300)
        torch.manual_seed(0)
        encoder = VLMEncoder(model_cfg=model_cfg, processor_path=str(processor), context_length=24,
                             lora={"r": 8, "dropout": 0.1}).to(args.device).train()
        optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-4)
        batch = {k: v.to(args.device) for k, v in _batch(processor, encoder, args.batch_size, 0).items()}
        modes: list[int | None] = [None, *args.chunks]
        times: dict[int | None, list[float]] = {m: [] for m in modes}
        memory: dict[int | None, int] = {}
        first_loss: dict[int | None, float] = {}
        for r in range(args.rounds):
            for mode in (modes if r % 2 == 0 else modes[::-1]):  # alternate the order: drift cancels out
                meter = SavedBytes()
                torch.manual_seed(1)
                state = {k: v.clone() for k, v in encoder.state_dict().items()}
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                for _ in range(args.steps):
                    start = time.perf_counter()
                    loss = step(encoder, optimizer, batch, mode, meter)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times[mode].append(time.perf_counter() - start)
                    first_loss.setdefault(mode, loss)
                memory[mode] = (torch.cuda.max_memory_allocated() - base if args.device.startswith("cuda")
                                else meter.peak)
                encoder.load_state_dict(state)  # every mode starts from the same weights
    kind = "peak CUDA memory over the step" if args.device.startswith("cuda") else "peak saved activations"
    params = sum(p.numel() for p in encoder.parameters())
    print(f"batch {args.batch_size}, device {args.device}, {args.threads} threads, {args.rounds} rounds x "
          f"{args.steps} steps; language model width {text['hidden_size']} x {text['num_hidden_layers']} layers, "
          f"{params / 1e6:.2f} M parameters; memory = {kind}")
    full_t, full_m = statistics.median(times[None]), memory[None]
    print(f"{'mode':<16}{'first loss':>12}{'median step s':>16}{'time vs full':>14}{'memory MiB':>12}"
          f"{'memory vs full':>16}")
    for mode in modes:
        name = "full" if mode is None else f"grad_cache({mode})"
        t = statistics.median(times[mode])
        print(f"{name:<16}{first_loss[mode]:>12.6f}{t:>16.3f}{t / full_t:>13.2f}x{memory[mode] / 2**20:>12.1f}"
              f"{memory[mode] / full_m:>15.2f}x")


if __name__ == "__main__":
    main()
