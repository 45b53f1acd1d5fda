"""The model's own losses against hand-computed values, naive reference loops and peer implementations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from reid_lab.losses import (
    LOSSES,
    ArcFaceLoss,
    CenterLoss,
    CircleLoss,
    CosFaceLoss,
    CrossEntropyLoss,
    ReIDLoss,
    TripletLoss,
    build_loss,
)

# ----------------------------------------------------------------------------------------------- contract


def fake_outputs(batch: int = 6, dim: int = 8, num_classes: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    features = torch.randn(batch, dim, requires_grad=True)
    bn_features = torch.randn(batch, dim, requires_grad=True)
    logits = torch.randn(batch, num_classes, requires_grad=True)
    return {"features": features, "bn_features": bn_features, "embedding": bn_features, "logits": logits}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_contract(name: str) -> None:
    loss = build_loss(name, weight=0.5)
    assert isinstance(loss, ReIDLoss) and loss.name == name and loss.weight == 0.5
    loss.bind(num_classes=3, feature_dim=8)
    outputs = fake_outputs()
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    value = loss(outputs, pids)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert any(t.grad is not None for t in outputs.values())
    assert all(p.grad is not None for p in loss.parameters())


def test_build_loss_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown loss 'focal'.*'triplet'"):
        build_loss("focal")
    with pytest.raises(TypeError, match=r"loss 'triplet' \(TripletLoss\).*margin"):
        build_loss("triplet", margn=0.3)


def test_missing_output_key_names_what_is_there() -> None:
    with pytest.raises(KeyError, match=r"outputs\['logits'\].*\['embedding', 'features'\].*num_classes > 0"):
        CrossEntropyLoss()(
            {"features": torch.zeros(2, 4), "embedding": torch.zeros(2, 4)}, torch.tensor([0, 1])
        )


# ------------------------------------------------------------------------------------------ cross-entropy


def test_label_smoothing_ce_hand_value() -> None:
    # softmax([0, ln 2, 0]) = [1/4, 1/2, 1/4], target 1;  softmax([ln 3, 0, 0]) = [3/5, 1/5, 1/5], target 2.
    logits = torch.tensor([[0.0, math.log(2.0), 0.0], [math.log(3.0), 0.0, 0.0]])
    pids = torch.tensor([1, 2])
    eps, k = 0.1, 3
    row1 = -(1 - eps) * math.log(1 / 2) - eps / k * (math.log(1 / 4) + math.log(1 / 2) + math.log(1 / 4))
    row2 = -(1 - eps) * math.log(1 / 5) - eps / k * (math.log(3 / 5) + 2 * math.log(1 / 5))
    # simplified by hand: row1 = ln2 * 16/15, row2 = ln5 - ln3/30
    assert row1 == pytest.approx(math.log(2) * 16 / 15)
    assert row2 == pytest.approx(math.log(5) - math.log(3) / 30)
    value = CrossEntropyLoss(epsilon=eps)({"logits": logits}, pids)
    assert value.item() == pytest.approx((row1 + row2) / 2, rel=1e-6)
    # BoT spreads eps over all K classes, target included: exactly torch's label_smoothing.
    torch.testing.assert_close(value, F.cross_entropy(logits, pids, label_smoothing=eps))


def test_ce_without_smoothing_is_plain_cross_entropy() -> None:
    logits = torch.randn(5, 4)
    pids = torch.tensor([0, 3, 1, 1, 2])
    torch.testing.assert_close(
        CrossEntropyLoss(epsilon=0.0)({"logits": logits}, pids), F.cross_entropy(logits, pids)
    )


def test_ce_errors() -> None:
    with pytest.raises(ValueError, match=r"pids must lie in \[0, 3\), got values in \[0, 3\]"):
        CrossEntropyLoss()({"logits": torch.zeros(2, 3)}, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="epsilon must be in"):
        CrossEntropyLoss(epsilon=1.0)


# ---------------------------------------------------------------------------------------------- triplet

# 1-D points 0, 1 (identity 0) and 3, 7 (identity 1). Hardest positive / negative distances by hand:
#   anchor 0: d_ap = 1, d_an = 3;   anchor 1: d_ap = 1, d_an = 2
#   anchor 3: d_ap = 4, d_an = 2;   anchor 7: d_ap = 4, d_an = 6
POINTS_1D = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
PIDS_1D = torch.tensor([0, 0, 1, 1])
D_AP_MINUS_D_AN = [-2.0, -1.0, 2.0, -2.0]


def test_triplet_batch_hard_hand_value() -> None:
    value = TripletLoss(margin=0.3)({"features": POINTS_1D}, PIDS_1D)
    assert value.item() == pytest.approx(sum(max(0.0, d + 0.3) for d in D_AP_MINUS_D_AN) / 4, abs=1e-5)
    assert value.item() == pytest.approx(2.3 / 4, abs=1e-5)


def test_triplet_soft_margin_hand_value() -> None:
    value = TripletLoss(margin=None)({"features": POINTS_1D}, PIDS_1D)
    expected = sum(math.log1p(math.exp(d)) for d in D_AP_MINUS_D_AN) / 4
    assert value.item() == pytest.approx(expected, abs=1e-5)


def test_triplet_excludes_anchors_without_positive() -> None:
    # A lone identity-2 point at 100 has no positive; as a negative it is never the closest one.
    features = torch.cat([POINTS_1D, torch.tensor([[100.0]])])
    pids = torch.cat([PIDS_1D, torch.tensor([2])])
    assert TripletLoss(margin=0.3)({"features": features}, pids).item() == pytest.approx(2.3 / 4, abs=1e-5)


def test_triplet_normalized_2d_hand_value() -> None:
    # After L2 normalisation: [1,0], [1,0] (id 0) and [0,1], [0,1] (id 1): d_ap = 0, d_an = sqrt(2).
    features = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    value = TripletLoss(margin=2.0, normalize_features=True)({"features": features}, PIDS_1D)
    assert value.item() == pytest.approx(2.0 - math.sqrt(2.0), abs=1e-5)


def test_triplet_gradient_moves_hard_pairs() -> None:
    features = POINTS_1D.clone().requires_grad_(True)
    TripletLoss(margin=0.3)({"features": features}, PIDS_1D).backward()
    # Only anchor 3 violates the margin: it is pulled towards 7 and pushed away from 1.
    # d/dx3 [(7 - x3) - (x3 - 1)] / 4 = -2/4; d/dx7 = +1/4; d/dx1 = +1/4; d/dx0 = 0.
    torch.testing.assert_close(features.grad.squeeze(1), torch.tensor([0.0, 0.25, -0.5, 0.25]))


def test_triplet_errors() -> None:
    with pytest.raises(ValueError, match="no anchor in the batch"):
        TripletLoss()({"features": torch.randn(3, 4)}, torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="margin must be >= 0 or None"):
        TripletLoss(margin=-1.0)


# ----------------------------------------------------------------------------------------------- circle


def naive_circle_loss(features: torch.Tensor, pids: list[int], m: float, gamma: float) -> float:
    """Sun et al. CVPR'20 Eq. 6 with alpha / Delta of Eq. 8, as explicit double sums per anchor."""
    x = [f / f.norm() for f in features.double()]
    losses = []
    for a in range(len(pids)):
        sp = [float(x[a] @ x[i]) for i in range(len(pids)) if i != a and pids[i] == pids[a]]
        sn = [float(x[a] @ x[j]) for j in range(len(pids)) if pids[j] != pids[a]]
        if not sp or not sn:
            continue
        total = 0.0
        for s_p, s_n in itertools.product(sp, sn):
            alpha_p, alpha_n = max(0.0, 1 + m - s_p), max(0.0, s_n + m)
            total += math.exp(gamma * alpha_n * (s_n - m)) * math.exp(-gamma * alpha_p * (s_p - (1 - m)))
        losses.append(math.log(1 + total))
    return sum(losses) / len(losses)


@pytest.mark.parametrize(("m", "gamma"), [(0.25, 16.0), (0.4, 32.0), (0.25, 128.0)])
def test_circle_matches_naive_paper_formula(m: float, gamma: float) -> None:
    torch.manual_seed(1)
    features = torch.randn(7, 5, dtype=torch.float64)
    pids = [0, 0, 1, 1, 1, 2, 3]  # identities 2 and 3 have no positive: excluded
    value = CircleLoss(margin=m, gamma=gamma)({"features": features}, torch.tensor(pids))
    assert value.item() == pytest.approx(naive_circle_loss(features, pids, m, gamma), rel=1e-9)


def test_circle_separated_pairs_hand_value() -> None:
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # s_p = 1 (alpha_p = m, so logit_p = -gamma m^2), s_n = 0 (alpha_n = m, logit_n = -gamma m^2):
    # each anchor has 1 positive and 2 negatives, so loss = log(1 + 2 exp(-2 gamma m^2)).
    value = CircleLoss(margin=0.25, gamma=64.0)({"features": features}, PIDS_1D)
    assert value.item() == pytest.approx(math.log1p(2 * math.exp(-2 * 64 * 0.25**2)), rel=1e-5)


# -------------------------------------------------------------------------------------- ArcFace, CosFace


def bound_margin_loss(cls: type, **kwargs) -> ArcFaceLoss | CosFaceLoss:
    loss = cls(scale=30.0, **kwargs)
    loss.bind(num_classes=3, feature_dim=2)
    with torch.no_grad():  # class directions 0 deg, 90 deg, 180 deg (norms are irrelevant)
        loss.class_weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [-3.0, 0.0]]))
    return loss


def at_angle(degrees: float, norm: float = 5.0) -> torch.Tensor:
    rad = math.radians(degrees)
    return norm * torch.tensor([[math.cos(rad), math.sin(rad)]])


def test_arcface_target_logit_hand_case() -> None:
    loss = bound_margin_loss(ArcFaceLoss, margin=0.5)
    logits = loss.margin_logits(at_angle(60.0), torch.tensor([0]))
    expected = [30 * math.cos(math.pi / 3 + 0.5), 30 * math.cos(math.pi / 6), 30 * math.cos(2 * math.pi / 3)]
    torch.testing.assert_close(logits, torch.tensor([expected]))
    value = loss({"bn_features": at_angle(60.0)}, torch.tensor([0]))
    expected_ce = -expected[0] + math.log(sum(math.exp(v) for v in expected))
    assert value.item() == pytest.approx(expected_ce, rel=1e-5)


def test_arcface_fallback_beyond_pi() -> None:
    # theta = 170 deg to class 0: theta + m > pi, so the target logit is s * (cos theta - m sin m).
    loss = bound_margin_loss(ArcFaceLoss, margin=0.5)
    logits = loss.margin_logits(at_angle(170.0), torch.tensor([0]))
    cos = math.cos(math.radians(170.0))
    assert logits[0, 0].item() == pytest.approx(30 * (cos - 0.5 * math.sin(0.5)), rel=1e-5)


def test_cosface_target_logit_hand_case() -> None:
    loss = bound_margin_loss(CosFaceLoss, margin=0.35)
    logits = loss.margin_logits(at_angle(60.0), torch.tensor([1]))
    expected = [30 * 0.5, 30 * (math.cos(math.pi / 6) - 0.35), 30 * -0.5]
    torch.testing.assert_close(logits, torch.tensor([expected]))


def test_margin_loss_label_smoothing_and_errors() -> None:
    loss = bound_margin_loss(CosFaceLoss, margin=0.35, epsilon=0.1)
    f, pids = torch.randn(4, 2), torch.tensor([0, 1, 2, 1])
    expected = F.cross_entropy(loss.margin_logits(f, pids), pids, label_smoothing=0.1)
    torch.testing.assert_close(loss({"bn_features": f}, pids), expected)
    with pytest.raises(RuntimeError, match=r"created by bind\(num_classes, feature_dim\)"):
        ArcFaceLoss()({"bn_features": f}, pids)
    with pytest.raises(ValueError, match=r"features must have shape \(B, 2\), got \(4, 3\)"):
        loss({"bn_features": torch.randn(4, 3)}, pids)


def test_bind_is_idempotent_for_same_sizes() -> None:
    loss = ArcFaceLoss()
    loss.bind(5, 4)
    weight = loss.class_weight
    loss.bind(5, 4)
    assert loss.class_weight is weight
    loss.bind(6, 4)
    assert loss.class_weight.shape == (6, 4)


# ------------------------------------------------------------------------------------------------ center


def test_center_loss_hand_value_and_gradients() -> None:
    loss = CenterLoss()
    loss.bind(num_classes=2, feature_dim=2)
    with torch.no_grad():
        loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    features = torch.tensor([[1.0, 0.0], [1.0, 3.0]], requires_grad=True)
    pids = torch.tensor([0, 1])
    value = loss({"features": features}, pids)
    # squared distances 1 and 4: 1/2 * mean = 1.25
    assert value.item() == pytest.approx(1.25)
    value.backward()
    # d/df_i = (f_i - c_{y_i}) / B: descent pulls features to their centers and centers to their features.
    torch.testing.assert_close(features.grad, torch.tensor([[0.5, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(loss.centers.grad, -features.grad)


def test_center_loss_errors() -> None:
    with pytest.raises(RuntimeError, match="bind"):
        CenterLoss()({"features": torch.zeros(2, 2)}, torch.tensor([0, 1]))
    loss = CenterLoss()
    loss.bind(2, 2)
    with pytest.raises(ValueError, match=r"pids must lie in \[0, 2\)"):
        loss({"features": torch.zeros(2, 2)}, torch.tensor([0, 5]))


@pytest.mark.parametrize("name", ["triplet", "circle", "arcface", "cosface", "center"])
def test_losses_ignore_autocast(name: str) -> None:
    # Distances / scaled cosines would be bfloat16 matmuls under autocast; the losses switch it off.
    loss = build_loss(name)
    loss.bind(num_classes=3, feature_dim=64)
    torch.manual_seed(0)
    f = torch.randn(6, 64)
    outputs = {"features": f, "bn_features": f}
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    reference = loss(outputs, pids)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = loss(outputs, pids)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference)
