"""The one embed path: flip TTA, projection, batch extraction in order, bad batches."""

from __future__ import annotations

import pytest
import torch

from reid_lab.data.records import ImageRecord
from reid_lab.embedding.embedder import Embedder, string_modality
from reid_lab.embedding.extract import embed_batches, extract
from reid_lab.models.reid_model import ReIDModel


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return ReIDModel("resnet18", num_classes=3, last_stride=2).eval()


def test_flip_and_projection_follow_their_definitions(encoder):
    images = torch.randn(4, 3, 64, 32)
    plain = encoder(images)["embedding"]
    mirrored = encoder(images.flip(3))["embedding"]
    projection = torch.nn.Linear(512, 8, bias=False)
    out = Embedder(encoder, flip_test=True, projection=projection)({"image": images})
    torch.testing.assert_close(out["image"], projection((plain + mirrored) / 2).detach())
    assert out["logits"].shape == (4, 3) and not out["image"].requires_grad
    torch.testing.assert_close(Embedder(encoder)({"image": images})["image"], plain.detach())


def test_embed_batches_keeps_order_and_metadata(encoder):
    images, pids = torch.randn(7, 3, 64, 32), torch.arange(7)
    batches = [{"image": images[i:i + 3], "pid": pids[i:i + 3]} for i in range(0, 7, 3)]
    out = embed_batches(Embedder(encoder), batches, keys=("pid", "logits"))
    torch.testing.assert_close(out["embedding"], encoder(images)["embedding"].detach(), rtol=1e-4, atol=1e-5)
    assert out["pid"].tolist() == list(range(7)) and out["logits"].shape == (7, 3)
    with pytest.raises(KeyError, match="camid"):
        embed_batches(Embedder(encoder), batches, keys=("camid",))
    with pytest.raises(ValueError, match="nothing to embed"):
        embed_batches(Embedder(encoder), [])


def test_an_image_encoder_refuses_a_caption_batch(encoder):
    with pytest.raises(ValueError, match=r"embeds \['image'\]; the batch holds \['text'\]"):
        Embedder(encoder)({"text": torch.zeros(2, 5, dtype=torch.long)})


def test_extract_reads_records_with_the_transform(tmp_path, encoder):
    from PIL import Image
    from torchvision.transforms import functional as F

    records = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 64), (40 * i, 80, 200 - 40 * i)).save(path)
        records.append(ImageRecord(str(path), i, 0))
    out = extract(Embedder(encoder), records, F.to_tensor, batch_size=2)
    stacked = torch.stack([F.to_tensor(Image.open(r.path).convert("RGB")) for r in records])
    torch.testing.assert_close(out["embedding"], encoder(stacked)["embedding"].detach(), rtol=1e-4, atol=1e-5)


def test_strings_that_read_as_missing_image_paths_are_not_embedded_as_captions(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"")
    dual = ("image", "text")
    with pytest.raises(FileNotFoundError, match=r"image a/typo\.jpg does not exist \(2 of 2 .*modality='text'"):
        string_modality(["a/typo.jpg", "b/typo.JPG"], dual)
    with pytest.raises(FileNotFoundError, match="b/typo.jpg"):  # one real file does not vouch for the others
        string_modality([str(image), "b/typo.jpg"], dual)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        string_modality(["missing.jpg"], ("image",))
    assert string_modality([str(image)], dual) == "image"
    assert string_modality(["a man in a red coat", "a woman with a bag"], dual) == "text"
    assert string_modality(["a/typo.jpg"], dual, modality="text") == "text"  # explicit: the user's call
    with pytest.raises(FileNotFoundError, match="a man"):
        string_modality(["a man in a red coat"], dual, modality="image")
    with pytest.raises(ValueError, match=r"embeds \['image'\], not 'text'"):
        string_modality(["a man"], ("image",), modality="text")
