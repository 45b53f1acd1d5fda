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


def _hardest(values: list[torch.Tensor], topk: int | None, largest: bool) -> list[torch.Tensor]:
    return sorted(values, key=lambda t: t.item(), reverse=largest)[:topk]


def torch_ract_terms(new, old, labels, tau: float, topk: int | None, with_n2n: bool = True) -> torch.Tensor:
    """Per-anchor RACT Eq. 3 terms L_i (B,), built element by element so autograd sees every path: the
    anchor n_i, and the new-to-new negatives n_j (gradient into the *other* samples' new features)."""
    n = torch.nn.functional.normalize(new, dim=1)
    o = torch.nn.functional.normalize(old.detach(), dim=1)
    ys = labels.tolist()
    terms = []
    for i in range(len(ys)):
        others = [j for j in range(len(ys)) if ys[j] != ys[i]]
        negs = _hardest([n[i] @ o[j] for j in others], topk, largest=True)
        if with_n2n:
            negs += _hardest([n[i] @ n[j] for j in others], topk, largest=True)
        logits = torch.stack([n[i] @ o[i]] + negs) / tau
        terms.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(terms)


def torch_triplet_terms(new, old, labels, margin: float, topk: int | None):
    """Per-anchor hinge sums and pair counts of triplet-RACT, per kind: (S_o (B,), c_o, S_n (B,), c_n)."""
    n = torch.nn.functional.normalize(new, dim=1)
    o = torch.nn.functional.normalize(old.detach(), dim=1)
    ys = labels.tolist()

    def d(a, b):
        return (a - b).pow(2).sum().clamp(min=1e-12).sqrt()

    sums_o, counts_o, sums_n, counts_n = [], [], [], []
    for i in range(len(ys)):
        pos = d(n[i], o[i])
        others = [j for j in range(len(ys)) if ys[j] != ys[i]]
        for sums, counts, other in ((sums_o, counts_o, o), (sums_n, counts_n, n)):
            kept = _hardest([d(n[i], other[j]) for j in others], topk, largest=False)
            sums.append(sum((torch.relu(pos + margin - dn) for dn in kept), new.new_zeros(())))
            counts.append(len(kept))
    return torch.stack(sums_o), counts_o, torch.stack(sums_n), counts_n


def triplet_contribution(terms, anchors) -> torch.Tensor:
    """Share of the anchors in the global-batch triplet-RACT loss: Σ_{i∈anchors} S_i / (all pairs), per kind."""
    sums_o, counts_o, sums_n, counts_n = terms
    return sums_o[anchors].sum() / max(sum(counts_o), 1) + sums_n[anchors].sum() / max(sum(counts_n), 1)


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


def test_ract_default_temperature_is_the_official_one() -> None:
    # OpenCompatible config.json / docs (and AdvBCT's benchmark): τ = 0.01, weight 1.0
    # (/work/shared/reference/compatible-learning.md §1.2); openBCT's --contra uses τ = 0.05.
    assert RACTLoss().temperature == 0.01 and RACTLoss().weight == 1.0
    assert ContrastiveN2O().temperature == 0.05
    # OpenCompatible triplet: margin 0.8, top-k negatives required (docs k = 10)
    assert TripletRACTLoss().margin == 0.8 and TripletRACTLoss().topk == 10


@pytest.mark.parametrize("topk", [None, 2])
def test_ract_gradient_includes_new_to_new_negatives(topk: int | None) -> None:
    """The gradient w.r.t. n_j has the terms of the anchors that use n_j as a new-to-new negative."""
    inputs = make_inputs(6)
    RACTLoss(temperature=0.5, topk=topk)(inputs).loss.backward()
    new = inputs.new_features.detach().clone().requires_grad_(True)
    torch_ract_terms(new, inputs.old_features, inputs.labels, 0.5, topk).mean().backward()
    torch.testing.assert_close(inputs.new_features.grad, new.grad, rtol=1e-9, atol=1e-12)
    # the n2n paths matter: without them (contra) the gradient differs
    without = inputs.new_features.detach().clone().requires_grad_(True)
    torch_ract_terms(without, inputs.old_features, inputs.labels, 0.5, topk, with_n2n=False).mean().backward()
    assert not torch.allclose(without.grad, new.grad)


@pytest.mark.parametrize("topk", [None, 2])
def test_triplet_ract_gradient_includes_new_to_new_negatives(topk: int | None) -> None:
    inputs = make_inputs(6)
    TripletRACTLoss(margin=0.8, topk=topk)(inputs).loss.backward()
    new = inputs.new_features.detach().clone().requires_grad_(True)
    terms = torch_triplet_terms(new, inputs.old_features, inputs.labels, 0.8, topk)
    triplet_contribution(terms, list(range(8))).backward()
    torch.testing.assert_close(inputs.new_features.grad, new.grad, rtol=1e-7, atol=1e-10)


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


def _ddp_plugins() -> list:
    return [
        RACTLoss(temperature=0.1, topk=3),
        RACTLoss(temperature=0.5),
        TripletRACTLoss(topk=2),
        TripletRACTLoss(topk=None),  # ranks hold 22 and 24 (anchor, negative) pairs per kind
        ContrastiveN2O(topk=3),
        ContrastiveN2O(temperature=0.5, positives="same_label"),
    ]


def _worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        full = make_inputs(7)
        local = slice(4 * rank, 4 * rank + 4)
        for k, plugin in enumerate(_ddp_plugins()):
            # (a) the DDP step: every rank backpropagates its own loss; DDP averages the gradients.
            new = full.new_features.detach()[local].clone().requires_grad_(True)
            out = plugin(CompatibleInputs(new, full.old_features.detach()[local], full.labels[local]))
            out.loss.backward()
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)
            results[("step", k, rank)] = (loss.item() / 2, (new.grad / 2).tolist())
            # (b) where gradients flow: only rank 0's loss is backpropagated; rank 1's features receive
            # gradient only through what rank 0 gathered from it *with* gradient (new-to-new negatives).
            new = full.new_features.detach()[local].clone().requires_grad_(True)
            out = plugin(CompatibleInputs(new, full.old_features.detach()[local], full.labels[local]))
            (out.loss * (1.0 if rank == 0 else 0.0)).backward()
            results[("rank0_only", k, rank)] = (new.grad / 2).tolist()
        # both ranks done with every collective before either tears gloo down: closing the group while the
        # peer's last operation is still in flight aborts the peer ("terminate called without an active
        # exception", seen once in CI-like runs)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _rank0_share_gradient(plugin, full: CompatibleInputs) -> torch.Tensor:
    """Single process, hand-built: gradient w.r.t. all 8 new features of the share of anchors 0-3 (rank 0's)
    in the global-batch loss."""
    new = full.new_features.detach().clone().requires_grad_(True)
    rank0 = list(range(4))
    if isinstance(plugin, TripletRACTLoss):
        terms = torch_triplet_terms(new, full.old_features, full.labels, plugin.margin, plugin.topk)
        triplet_contribution(terms, rank0).backward()
    elif plugin.positives == "same_label":
        n = torch.nn.functional.normalize(new, dim=1)
        o = torch.nn.functional.normalize(full.old_features.detach(), dim=1)
        ys, tau, total = full.labels.tolist(), plugin.temperature, 0.0
        for i in rank0:
            negs = torch.stack([n[i] @ o[j] for j in range(8) if ys[j] != ys[i]]) / tau
            positives = [p for p in range(8) if ys[p] == ys[i]]
            for p in positives:
                logits = torch.cat([(n[i] @ o[p]).view(1) / tau, negs])
                total = total + (torch.logsumexp(logits, 0) - logits[0]) / len(positives)
        (total / 8).backward()
    else:
        terms = torch_ract_terms(
            new, full.old_features, full.labels, plugin.temperature, plugin.topk, with_n2n=plugin.with_n2n
        )
        (terms[rank0].sum() / 8).backward()
    return new.grad


@pytest.mark.slow
def test_two_process_gather_equals_global_batch_and_gradients_flow_across_ranks() -> None:
    """Per plugin, with the batch split over two gloo ranks:

    - the mean of per-rank losses and the DDP-averaged gradients equal the single-process full-batch loss and
      gradient (triplet-RACT: averaged over the *global* pair count, although the ranks hold 22 vs 24 pairs);
    - backpropagating rank 0's loss alone gives rank 0 and rank 1 the slices of the hand-built gradient of rank
      0's share of the loss: new features gathered from rank 1 receive gradient through RACT / triplet-RACT's
      new-to-new negatives (non-zero), and none through the contrastive loss (old features only).
    """
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for k, plugin in enumerate(_ddp_plugins()):
        full = make_inputs(7)
        out = plugin(full)
        out.loss.backward()
        assert results[("step", k, 0)][0] == pytest.approx(out.loss.item(), rel=1e-9), plugin
        assert results[("step", k, 1)][0] == pytest.approx(out.loss.item(), rel=1e-9), plugin
        gathered = torch.tensor(results[("step", k, 0)][1] + results[("step", k, 1)][1], dtype=torch.float64)
        torch.testing.assert_close(gathered, full.new_features.grad, rtol=1e-7, atol=1e-10)

        expected = _rank0_share_gradient(plugin, make_inputs(7))
        rank0 = torch.tensor(results[("rank0_only", k, 0)], dtype=torch.float64)
        rank1 = torch.tensor(results[("rank0_only", k, 1)], dtype=torch.float64)
        torch.testing.assert_close(rank0, expected[:4], rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(rank1, expected[4:], rtol=1e-7, atol=1e-10)
        if isinstance(plugin, ContrastiveN2O) and not plugin.with_n2n:
            assert rank1.abs().max() == 0.0, plugin
        else:
            assert rank1.abs().max() > 1e-6, plugin
