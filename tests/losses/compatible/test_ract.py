"""RACT (B. Zhang et al., ICLR 2022) and its triplet / point-to-centre variants against loops of the formulas."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reid_lab.losses.compatible.base import CompatibleInputs
from reid_lab.losses.compatible.contrastive import ContrastiveN2O
from reid_lab.losses.compatible.ract import BCTRACTLoss, RACTLoss, TripletRACTLoss

SQRT2 = math.sqrt(2.0)


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def distance(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def naive_ract(new, old, labels, tau: float, topk: int | None = None) -> float:
    """RACT Eq. 3 per anchor: positive o_i; negatives o_j and n_j with y_j != y_i (top-k of each kind)."""
    news, olds, ys = [unit(v) for v in new.tolist()], [unit(v) for v in old.tolist()], labels.tolist()
    total = 0.0
    for i in range(len(ys)):
        pos = dot(news[i], olds[i])
        others = [j for j in range(len(ys)) if ys[j] != ys[i]]
        neg_old = sorted((dot(news[i], olds[j]) for j in others), reverse=True)[:topk]
        neg_new = sorted((dot(news[i], news[j]) for j in others), reverse=True)[:topk]
        denominator = math.exp(pos / tau) + sum(math.exp(s / tau) for s in neg_old + neg_new)
        total += -math.log(math.exp(pos / tau) / denominator)
    return total / len(ys)


def naive_triplet_ract(new, old, labels, margin: float, topk: int | None) -> float:
    """Mean over (anchor, kept negative) pairs of relu(d(n_i,o_i) + m - d_neg), per kind; kinds summed."""
    news, olds, ys = [unit(v) for v in new.tolist()], [unit(v) for v in old.tolist()], labels.tolist()
    pairs_old, pairs_new = [], []
    for i in range(len(ys)):
        pos = distance(news[i], olds[i])
        others = [j for j in range(len(ys)) if ys[j] != ys[i]]
        for d in sorted(distance(news[i], olds[j]) for j in others)[:topk]:
            pairs_old.append(max(0.0, pos + margin - d))
        for d in sorted(distance(news[i], news[j]) for j in others)[:topk]:
            pairs_new.append(max(0.0, pos + margin - d))
    return sum(pairs_old) / max(len(pairs_old), 1) + sum(pairs_new) / max(len(pairs_new), 1)


def naive_bct_ract(new, old_classifier, new_classifier, labels, scale: float | None) -> float:
    """CE over [W_o n_i ; W_n n_i without column y_i], target y_i in the old block; skip y_i >= C_old.

    ``new`` (B, d_old) and both classifiers (C, d_old) live in the old space's dimension."""
    losses = []
    for n, y in zip(new.tolist(), labels.tolist()):
        if y >= len(old_classifier):
            continue
        if scale is None:
            old_logits = [dot(n, w) for w in old_classifier.tolist()]
            new_logits = [dot(n, w) for w in new_classifier.tolist()]
        else:
            old_logits = [scale * dot(unit(n), unit(w)) for w in old_classifier.tolist()]
            new_logits = [scale * dot(unit(n), unit(w)) for w in new_classifier.tolist()]
        logits = old_logits + [z for k, z in enumerate(new_logits) if k != y]
        losses.append(math.log(sum(math.exp(z) for z in logits)) - old_logits[y])
    return sum(losses) / len(losses)


def make_inputs(seed: int, batch: int = 8) -> CompatibleInputs:
    generator = torch.Generator().manual_seed(seed)
    new = torch.randn(batch, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    old = torch.randn(batch, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    return CompatibleInputs(new, old, torch.tensor([0, 1, 1, 2, 0, 3, 2, 1])[:batch])


# ---------------------------------------------------------------------------------------------- RACT


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tau", [0.01, 0.5])
@pytest.mark.parametrize("topk", [None, 1, 2, 50])
def test_ract_matches_loop(seed: int, tau: float, topk: int | None) -> None:
    inputs = make_inputs(seed)
    out = RACTLoss(temperature=tau, topk=topk)(inputs)
    expected = naive_ract(inputs.new_features, inputs.old_features, inputs.labels, tau, topk)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.parts["ract/loss"].item() == pytest.approx(expected, rel=1e-9)


def three_samples() -> CompatibleInputs:
    new = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    return CompatibleInputs(new, old, torch.tensor([0, 0, 1]))


def test_ract_hand_worked() -> None:
    # τ = 1. Anchor 1: pos 1, negatives <n1,o3> = -1, <n1,n3> = 0 (sample 2 shares the label: ignored).
    # Anchor 2: pos 0, same negatives. Anchor 3: pos 0; n2o negatives 0, 1; n2n negatives 0, 0.
    l1 = math.log(1 + math.exp(-2) + math.exp(-1))
    l2 = math.log(2 + math.exp(-1))
    l3 = math.log(4 + math.e)
    out = RACTLoss(temperature=1.0)(three_samples())
    assert out.loss.item() == pytest.approx((l1 + l2 + l3) / 3, rel=1e-6)
    # top-1: anchor 3 keeps o_2 (sim 1) and one new negative (sim 0).
    out = RACTLoss(temperature=1.0, topk=1)(three_samples())
    assert out.loss.item() == pytest.approx((l1 + l2 + math.log(2 + math.e)) / 3, rel=1e-6)
    # diagnostics: only anchor 3 has a negative above its positive (<n3,o2> = 1 > <n3,o3> = 0); anchor 2's
    # hardest new negative ties its positive (0 = 0), which is not a violation.
    assert out.parts["ract/pos_sim"].item() == pytest.approx(1 / 3)
    assert out.parts["ract/n2o_violation_rate"].item() == pytest.approx(1 / 3)
    assert out.parts["ract/n2n_violation_rate"].item() == pytest.approx(0.0)


def test_ract_exceeds_contrastive_by_new_negatives() -> None:
    # Same inputs: RACT's denominator has extra positive terms, so L_RACT > L_contra.
    inputs = make_inputs(5)
    assert RACTLoss(temperature=0.1)(inputs).loss > ContrastiveN2O(temperature=0.1)(inputs).loss


@pytest.mark.parametrize(
    "plugin", [RACTLoss(), RACTLoss(topk=2), TripletRACTLoss(), TripletRACTLoss(topk=None)]
)
def test_point_losses_gradients_reach_new_features_only(plugin) -> None:
    inputs = make_inputs(2)
    plugin(inputs).loss.backward()
    assert inputs.new_features.grad is not None and inputs.new_features.grad.abs().sum() > 0
    assert torch.isfinite(inputs.new_features.grad).all()
    assert inputs.old_features.grad is None


def test_invalid_topk() -> None:
    with pytest.raises(ValueError, match="topk"):
        RACTLoss(topk=0)
    with pytest.raises(ValueError, match="topk"):
        TripletRACTLoss(topk=-1)


# -------------------------------------------------------------------------------------- triplet RACT


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("margin", [0.8, 0.2])
@pytest.mark.parametrize("topk", [None, 1, 2, 10])
def test_triplet_ract_matches_loop(seed: int, margin: float, topk: int | None) -> None:
    inputs = make_inputs(seed)
    out = TripletRACTLoss(margin=margin, topk=topk)(inputs)
    expected = naive_triplet_ract(inputs.new_features, inputs.old_features, inputs.labels, margin, topk)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert out.parts["triplet_ract/n2o"].item() + out.parts["triplet_ract/n2n"].item() == pytest.approx(
        out.loss.item()
    )


def test_triplet_ract_hand_worked() -> None:
    # Distances (see test_ract_hand_worked's features), m = 0.8:
    # n2o pairs: a1 (p 0, d 2) -> 0; a2 (p √2, d 2) -> √2 - 1.2; a3 (p √2, d √2, 0) -> 0.8, √2 + 0.8.
    # n2n pairs: a1 (d √2) -> 0; a2 (d √2) -> 0.8; a3 (d √2, √2) -> 0.8, 0.8.
    out = TripletRACTLoss(margin=0.8, topk=None)(three_samples())
    assert out.loss.item() == pytest.approx((2 * SQRT2 + 0.4) / 4 + 2.4 / 4, abs=1e-5)
    out = TripletRACTLoss(margin=0.8, topk=1)(three_samples())
    assert out.loss.item() == pytest.approx((2 * SQRT2 - 0.4) / 3 + 1.6 / 3, abs=1e-5)


def test_triplet_ract_without_negatives_is_zero() -> None:
    inputs = make_inputs(0, batch=3)
    inputs.labels = torch.tensor([4, 4, 4])
    out = TripletRACTLoss()(inputs)
    assert out.loss.item() == 0.0 and out.loss.requires_grad


# ------------------------------------------------------------------------------------------ bct_ract


class HostShaped:
    """bct_ract inputs as the host builds them: φ_new's features (B, d_new) and head (C_new, d_new) are leaves;
    the dimension adapter P (d_old, d_new) maps both to d_old (identity when d_new == d_old)."""

    def __init__(self, seed: int, num_old: int = 5, d_new: int = 4, d_old: int = 4) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.new_all = torch.randn(8, d_new, generator=generator, dtype=torch.float64, requires_grad=True)
        self.head = torch.randn(5, d_new, generator=generator, dtype=torch.float64, requires_grad=True)
        self.adapter = (
            torch.eye(d_old, dtype=torch.float64)
            if d_new == d_old
            else torch.randn(d_old, d_new, generator=generator, dtype=torch.float64)
        )
        self.old = torch.randn(8, d_old, generator=generator, dtype=torch.float64)
        self.old_classifier = torch.randn(num_old, d_old, generator=generator, dtype=torch.float64)
        self.labels = torch.tensor([0, 1, 1, 2, 0, 3, 2, 4])

    def inputs(self) -> CompatibleInputs:
        return CompatibleInputs(
            self.new_all @ self.adapter.t(),
            self.old,
            self.labels,
            old_classifier=self.old_classifier.clone().requires_grad_(True),
            new_all_features=self.new_all,
            extras={"new_classifier": self.head @ self.adapter.t()},
        )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scale", [None, 8.0])
@pytest.mark.parametrize("d_new", [4, 6, 3])
def test_bct_ract_matches_loop(seed: int, scale: float | None, d_new: int) -> None:
    """d_new != d_old: every product is in d_old (adapted features against the adapted head)."""
    case = HostShaped(seed, d_new=d_new)
    inputs = case.inputs()
    out = BCTRACTLoss(scale=scale)(inputs)
    expected = naive_bct_ract(
        inputs.new_features, case.old_classifier, inputs.extras["new_classifier"], case.labels, scale
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.parts["bct_ract/valid_fraction"].item() == 1.0


def test_bct_ract_dimension_change_gradients_match_autograd() -> None:
    # d_new = 6, d_old = 4: the gradient w.r.t. φ_new's own features and head flows through the adapter.
    case = HostShaped(2, d_new=6)
    inputs = case.inputs()
    BCTRACTLoss()(inputs).loss.backward()
    got_features, got_head = case.new_all.grad.clone(), case.head.grad.clone()
    assert inputs.old_classifier.grad is None
    # hand-built: CE over [W_o P f_i ; (W_n P^T)(P f_i) with -inf at y_i], target y_i
    new_all = case.new_all.detach().clone().requires_grad_(True)
    head = case.head.detach().clone().requires_grad_(True)
    n = new_all @ case.adapter.t()
    w_n = head @ case.adapter.t()
    total = 0.0
    for i, y in enumerate(case.labels.tolist()):
        new_logits = torch.cat([w_n[:y] @ n[i], w_n[y + 1 :] @ n[i]])
        logits = torch.cat([case.old_classifier @ n[i], new_logits])
        total = total + torch.logsumexp(logits, 0) - logits[y]
    (total / 8).backward()
    torch.testing.assert_close(got_features, new_all.grad)
    torch.testing.assert_close(got_head, head.grad)


def test_bct_ract_hand_worked() -> None:
    # n = (1, 0), W_o = W_n = I, y = 0: logits [1, 0 | (masked), 0] -> log(1 + 2/e).
    features = torch.tensor([[1.0, 0.0]])
    inputs = CompatibleInputs(
        features,
        features,
        torch.tensor([0]),
        old_classifier=torch.eye(2),
        extras={"new_classifier": torch.eye(2)},
    )
    assert BCTRACTLoss()(inputs).loss.item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)


def test_bct_ract_skips_classes_without_old_row() -> None:
    case = HostShaped(3, num_old=3)  # labels 3 and 4 have no old row
    inputs = case.inputs()
    out = BCTRACTLoss()(inputs)
    expected = naive_bct_ract(
        inputs.new_features, case.old_classifier, inputs.extras["new_classifier"], case.labels, None
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.parts["bct_ract/valid_fraction"].item() == pytest.approx(6 / 8)


def test_bct_ract_gradients_and_errors() -> None:
    case = HostShaped(1)
    inputs = case.inputs()
    BCTRACTLoss()(inputs).loss.backward()
    assert case.new_all.grad.abs().sum() > 0
    assert case.head.grad.abs().sum() > 0  # the new head is trained, as in the code
    assert inputs.old_classifier.grad is None

    missing_head = HostShaped(0).inputs()
    del missing_head.extras["new_classifier"]
    with pytest.raises(ValueError, match="new_classifier"):
        BCTRACTLoss()(missing_head)
    no_old = HostShaped(0).inputs()
    no_old.old_classifier = None
    with pytest.raises(ValueError, match="old_classifier"):
        BCTRACTLoss()(no_old)
    wrong_dim = HostShaped(0).inputs()
    wrong_dim.extras["new_classifier"] = torch.zeros(5, 6)  # not mapped to d_old = 4
    with pytest.raises(ValueError, match="d_old"):
        BCTRACTLoss()(wrong_dim)


def test_names() -> None:
    assert (RACTLoss.name, TripletRACTLoss.name, BCTRACTLoss.name) == ("ract", "triplet_ract", "bct_ract")
    assert BCTRACTLoss.needs == {"old_classifier", "new_classifier"}


# --------------------------------------------------------------------------------- two-process gather


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        full = make_inputs(7)
        for plugin in (RACTLoss(temperature=0.1, topk=3), TripletRACTLoss(topk=2), ContrastiveN2O(topk=3)):
            local = slice(4 * rank, 4 * rank + 4)
            new = full.new_features.detach()[local].clone().requires_grad_(True)
            out = plugin(CompatibleInputs(new, full.old_features.detach()[local], full.labels[local]))
            out.loss.backward()
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)
            results[(plugin.name, rank)] = (loss.item() / 2, (new.grad / 2).tolist())
        # both ranks done with every collective before either tears gloo down: closing the group while the
        # peer's last operation is still in flight aborts the peer ("terminate called without an active
        # exception", seen once in CI-like runs)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gather_equals_global_batch() -> None:
    """Mean of per-rank losses and DDP-averaged gradients equal the single-process loss on the whole batch."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for plugin in (RACTLoss(temperature=0.1, topk=3), TripletRACTLoss(topk=2), ContrastiveN2O(topk=3)):
        full = make_inputs(7)
        out = plugin(full)
        out.loss.backward()
        assert results[(plugin.name, 0)][0] == pytest.approx(out.loss.item(), rel=1e-9)
        gathered = torch.tensor(
            results[(plugin.name, 0)][1] + results[(plugin.name, 1)][1], dtype=torch.float64
        )
        assert torch.allclose(gathered, full.new_features.grad, rtol=1e-7, atol=1e-10)
