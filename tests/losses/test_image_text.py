"""Image–text losses against naive loops of their papers' formulas, and their 2-process gloo gathers."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reid_lab.losses.image_text import CLIPLoss, SDMLoss, SigLIPLoss, SupConLoss, build_image_text_loss


def pairs(seed: int = 0, n: int = 8, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=g, dtype=torch.float64)
    text = torch.randn(n, d, generator=g, dtype=torch.float64)
    pids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1])[:n]
    return image, text, pids


def unit(x):
    return x / x.norm(dim=1, keepdim=True)


def naive_clip(image, text, logit_scale):
    s, i, t = math.exp(logit_scale), unit(image), unit(text)
    n, total = len(i), 0.0
    for a in range(n):  # image a against every caption, and caption a against every image
        row = [s * float(i[a] @ t[b]) for b in range(n)]
        col = [s * float(t[a] @ i[b]) for b in range(n)]
        total += (math.log(sum(math.exp(v) for v in row)) - row[a]) + (math.log(sum(math.exp(v) for v in col)) - col[a])
    return total / (2 * n)


def naive_siglip(image, text, scale, bias):
    i, t = unit(image), unit(text)
    n, total = len(i), 0.0
    for a in range(n):
        for b in range(n):
            z = 1.0 if a == b else -1.0
            total += -math.log(1 / (1 + math.exp(-z * (scale * float(i[a] @ t[b]) + bias))))
    return total / n


def naive_sdm(image, text, pids, scale, eps=1e-8):
    i, t = unit(image), unit(text)
    n, total = len(i), 0.0
    for sim in ([[scale * float(i[a] @ t[b]) for b in range(n)] for a in range(n)],
                [[scale * float(t[a] @ i[b]) for b in range(n)] for a in range(n)]):
        for a in range(n):
            positives = sum(int(pids[b] == pids[a]) for b in range(n))
            log_z = math.log(sum(math.exp(v) for v in sim[a]))
            for b in range(n):
                p = math.exp(sim[a][b] - log_z)
                q = (1.0 if pids[b] == pids[a] else 0.0) / positives
                total += p * ((sim[a][b] - log_z) - math.log(q + eps)) / n
    return total


def naive_supcon(image, text, pids, logit_scale):
    """Khosla et al. NeurIPS'20 per anchor, cross-modal: mean over the anchor's same-pid keys of -log softmax."""
    s, i, t = math.exp(logit_scale), unit(image), unit(text)
    n, total = len(i), 0.0
    for anchors, keys in ((i, t), (t, i)):
        for a in range(n):
            logits = [s * float(anchors[a] @ keys[b]) for b in range(n)]
            log_z = math.log(sum(math.exp(v) for v in logits))
            positives = [b for b in range(n) if pids[b] == pids[a]]
            total += -sum(logits[b] - log_z for b in positives) / len(positives)
    return total / (2 * n)


def test_clip_loss_is_the_symmetric_infonce():
    image, text, pids = pairs()
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    got = CLIPLoss()(image, text, pids, scale)
    assert float(got) == pytest.approx(naive_clip(image, text, float(scale)), rel=1e-9)


def test_siglip_loss_is_the_pairwise_sigmoid_with_its_own_scale_and_bias():
    image, text, pids = pairs(1)
    loss = SigLIPLoss(init_scale=10.0, init_bias=-10.0).double()
    got = loss(image, text, pids, torch.zeros(()))
    assert float(got) == pytest.approx(naive_siglip(image, text, 10.0, -10.0), rel=1e-7)
    assert {n for n, _ in loss.named_parameters()} == {"log_scale", "bias"}  # learnable, as in the paper


def test_sdm_matches_irra_and_rewards_identity_structure():
    image, text, pids = pairs(2)
    got = SDMLoss(scale=50.0)(image, text, pids, torch.zeros(()))
    assert float(got) == pytest.approx(naive_sdm(image, text, pids, 50.0), rel=1e-7)
    # hand case: captions equal to their images and all identities distinct -> q is the identity; a large
    # scale puts all softmax mass on the diagonal, so both KL terms go to 0
    eye = torch.eye(4, dtype=torch.float64)
    assert float(SDMLoss(scale=1000.0)(eye, eye, torch.arange(4), torch.zeros(()))) == pytest.approx(0, abs=1e-6)
    # scale=None uses the model's learnable temperature
    learned = SDMLoss(scale=None)(image, text, pids, torch.tensor(math.log(20.0), dtype=torch.float64))
    assert float(learned) == pytest.approx(naive_sdm(image, text, pids, 20.0), rel=1e-7)


def test_supcon_is_the_cross_modal_supervised_contrastive_loss():
    image, text, pids = pairs(4)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    got = build_image_text_loss("supcon")(image, text, pids, scale)
    assert float(got) == pytest.approx(naive_supcon(image, text, pids, float(scale)), rel=1e-9)
    # hand case: two identities of two pairs each, every caption equal to its image; a large scale spreads
    # each anchor's softmax evenly over its two (equal) positives: loss -> log 2
    e = torch.eye(2, dtype=torch.float64)
    same = torch.cat([e, e])
    hand = SupConLoss()(same, same, torch.tensor([0, 1, 0, 1]), torch.tensor(math.log(1000.0), dtype=torch.float64))
    assert float(hand) == pytest.approx(math.log(2), abs=1e-9)


def test_supcon_with_distinct_identities_is_clip_infonce():
    image, text, _ = pairs(5)
    distinct = torch.arange(len(image)) * 3 + 1
    scale = torch.tensor(math.log(20.0), dtype=torch.float64)
    supcon = SupConLoss()(image, text, distinct, scale)
    assert float(supcon) == pytest.approx(float(CLIPLoss()(image, text, distinct, scale)), rel=1e-12)
    # with shared identities the two differ: CLIP counts same-pid captions as negatives
    _, _, pids = pairs(5)
    assert float(SupConLoss()(image, text, pids, scale)) != pytest.approx(float(CLIPLoss()(image, text, pids, scale)))


def test_unknown_names_and_options_are_named():
    with pytest.raises(ValueError, match="unknown image-text loss 'clip2'"):
        build_image_text_loss("clip2")
    with pytest.raises(TypeError, match="'sdm'"):
        build_image_text_loss("sdm", temperature=3)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses():
    return [CLIPLoss(), SigLIPLoss().double(), SDMLoss(scale=20.0), SupConLoss()]


def _worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        image, text, pids = pairs(3)
        local = slice(4 * rank, 4 * rank + 4)
        scale = torch.tensor(math.log(10.0), dtype=torch.float64)
        for k, loss in enumerate(_losses()):
            i = image[local].clone().requires_grad_(True)
            t = text[local].clone().requires_grad_(True)
            value = loss(i, t, pids[local], scale)
            value.backward()
            results[(k, rank)] = (float(value), i.grad.tolist(), t.grad.tolist())
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gather_gives_the_full_batch_loss_and_gradients():
    """DDP averages per-rank losses and gradients: with the pairs split over two gloo ranks, both equal the
    single-process loss and gradient of the full batch (so the gathers carry gradients across ranks)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    image, text, pids = pairs(3)
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    for k, loss in enumerate(_losses()):
        i, t = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
        full = loss(i, t, pids, scale)
        full.backward()
        assert (results[(k, 0)][0] + results[(k, 1)][0]) / 2 == pytest.approx(float(full), rel=1e-9), loss.name
        grad_i = torch.tensor(results[(k, 0)][1] + results[(k, 1)][1], dtype=torch.float64) / 2
        grad_t = torch.tensor(results[(k, 0)][2] + results[(k, 1)][2], dtype=torch.float64) / 2
        torch.testing.assert_close(grad_i, i.grad, rtol=1e-7, atol=1e-10, msg=loss.name)
        torch.testing.assert_close(grad_t, t.grad, rtol=1e-7, atol=1e-10, msg=loss.name)
