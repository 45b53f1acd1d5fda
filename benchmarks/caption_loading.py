"""Caption tokenisation and image loading throughput against the VLM step they feed.

    python benchmarks/caption_loading.py --threads 2                        # 512 items, workers 0 and 2
    python benchmarks/caption_loading.py --items 128 --workers 0 --steps 1  # smoke run

The data path of a caption -> person-image step: JPEG files (256 x 128, written to a temporary folder)
decoded with PIL and transformed by :func:`~reid_lab.data.transforms.build_test_transform`, captions
tokenised by :class:`~reid_lab.data.text.VLMTextTokenizer` in the collate function, through a
``torch.utils.data.DataLoader`` with 0 or more worker processes. Reported, in one run:

* ``tokenise``: captions per second of the tokenizer alone (batches of ``--batch-size``);
* ``load(w)``: items per second of the whole loader with ``w`` workers;
* ``step``: items per second of the model step those batches feed: the tiny Qwen2-VL of
  ``configs/model/vlm_tiny_qwen2.yaml`` (``prompt_format: vlm2vec``), caption -> image InfoNCE, backward, on
  ``--device``.

The loader keeps the step fed when ``load / step >= 1``. On a CPU the step is slow and the ratio is large;
a GPU step is many times faster, so the ratio to watch there is the one this script prints on that machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from reid_lab.data.text.tokenizers import VLMTextTokenizer
from reid_lab.data.text.vlm_processor import build_offline_processor
from reid_lab.data.transforms import build_test_transform
from reid_lab.losses.image_text import InfoNCELoss
from reid_lab.models.vlm import VLMEncoder

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "vlm_tiny_qwen2.yaml"
WORDS = ["a", "man", "woman", "in", "red", "blue", "coat", "jacket", "with", "black", "shoes", "bag", "walking",
         "carrying", "backpack", "white", "skirt", "long", "hair", "grey", "trousers"]


class CaptionImages(Dataset):
    """``(image tensor, caption)`` pairs read from JPEG files."""

    def __init__(self, paths: list[Path], captions: list[str]) -> None:
        self.paths, self.captions, self.transform = paths, captions, build_test_transform((256, 128))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.captions[i]


class Collate:
    """Stack the images and tokenise the batch's captions (picklable for worker processes)."""

    def __init__(self, tokenizer: VLMTextTokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, rows):
        images, captions = zip(*rows)
        return {"image": torch.stack(images), "text": self.tokenizer(list(captions))}


def _write(folder: Path, n: int) -> tuple[list[Path], list[str]]:
    g = torch.Generator().manual_seed(0)
    paths, captions = [], []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        pixels = torch.randint(0, 256, (256, 128, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
        captions.append(" ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (20,), generator=g)))
    return paths, captions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--steps", type=int, default=3, help="timed model steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths, captions = _write(Path(tmp), args.items)
        processor = build_offline_processor(Path(tmp) / "processor", captions[:200] + WORDS, vocab_size=320)
        tokenizer = VLMTextTokenizer(str(processor), context_length=40)
        rows = []
        start = time.perf_counter()
        for i in range(0, len(captions), args.batch_size):
            tokenizer(captions[i:i + args.batch_size])
        rows.append(("tokenise", len(captions) / (time.perf_counter() - start)))
        dataset = CaptionImages(paths, captions)
        for workers in args.workers:
            loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=workers, collate_fn=Collate(tokenizer),
                                persistent_workers=False)
            start = time.perf_counter()
            seen = sum(len(batch["text"]) for batch in loader)
            rows.append((f"load({workers})", seen / (time.perf_counter() - start)))
        cfg = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["model_cfg"]
        torch.manual_seed(0)
        encoder = VLMEncoder(model_cfg=cfg, processor_path=str(processor), context_length=40,
                             prompt_format="vlm2vec").to(args.device).train()
        batch = Collate(tokenizer)([dataset[i] for i in range(args.batch_size)])
        batch = {k: v.to(args.device) for k, v in batch.items()}
        loss_fn, scale = InfoNCELoss(), torch.tensor(50.0).log()

        def model_step():
            reps = encoder.encode(batch)
            loss_fn(reps["image"], reps["text"], None, scale).backward()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        model_step()  # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            model_step()
        step_rate = args.steps * args.batch_size / (time.perf_counter() - start)
    print(f"device {args.device}, threads {args.threads}, load average {os.getloadavg()}, {args.items} items, "
          f"batch {args.batch_size}")
    print("| stage | items / s | vs model step |")
    print("|---|---|---|")
    for name, rate in rows + [("step", step_rate)]:
        print(f"| {name} | {rate:.1f} | {rate / step_rate:.1f}x |")


if __name__ == "__main__":
    main()
