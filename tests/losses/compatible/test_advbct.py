"""AdvBCT (Pan et al., CVPR 2023) against line-by-line transcriptions of the official code (Ashespt/AdvBCT):
``extract_feat.gen_class_meta`` (class centres and 1.5·IQR radii), the per-sample ``bct_limit`` loop with the
elastic boundary, the ``adv_compatible`` discriminator loss and its schedules, and the gradient reversal
checked with autograd."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reid_lab.losses.compatible.advbct import (
    AdvBCTLoss,
    adversarial_weight,
    class_radii,
    grl_coefficient,
)
from reid_lab.losses.compatible.base import CompatibleInputs

D, C, B = 5, 4, 12


def official_class_meta(feat: np.ndarray, label: np.ndarray) -> dict[int, dict]:
    """``extract_feat.gen_class_meta`` of the official code, without the file I/O."""
    feat = feat.copy()
    feat_dict = defaultdict(list)
    for i in range(len(label)):
        feat[i] = feat[i] / np.linalg.norm(feat[i])
        feat_dict[int(label[i])].append(feat[i])
    data_dict = {}
    for k in feat_dict:
        center = np.asarray(feat_dict[k]).mean(0)
        radius = sorted(float(np.linalg.norm(f - center)) for f in feat_dict[k])
        radius_new = []
        if len(radius) >= 4:
            nu = len(radius)
            q3, q1 = radius[int(3 * nu / 4)], radius[int(nu / 4)]
            iqr = q3 - q1
            radius_new = [r for r in radius if not (r < q1 - 1.5 * iqr or r > q3 + 1.5 * iqr)]
        else:
            radius_new = list(radius)
        if len(radius_new) == 0:
            radius_new = radius
        data_dict[k] = {"center": center, "radius": radius_new}
    return data_dict


def official_boundary(feat, labels, meta, elastic_w, threshold):
    """The official ``bct_limit`` loop with ``ELASTIC_BOUNDARY`` (radius_eb = |r_max - T| · σ(w))."""
    limit_loss, cnt = 0.0, 0
    feat = F.normalize(feat)
    for j in range(len(feat)):
        k = labels[j].item()
        if k not in meta:
            continue
        r_max = meta[k]["radius"][-1]
        radius_eb = abs(r_max - threshold) * torch.sigmoid(elastic_w[k])
        diff = feat[j] - torch.tensor(meta[k]["center"], dtype=feat.dtype)[None, :]
        radius = r_max + radius_eb if r_max < threshold else r_max - radius_eb
        if len(meta[k]["radius"]) <= 1:
            continue
        tmp = torch.clamp(torch.norm(diff, p=2) - radius, min=0)
        if tmp > 0.0:
            limit_loss = limit_loss + tmp
            cnt += 1
    return limit_loss / cnt if cnt else torch.tensor(0.0)


def class_data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # class sizes 6 (with one far outlier), 4, 3, 1: IQR filtering, n < 4, and a single image
    labels = torch.tensor([0] * 6 + [1] * 4 + [2] * 3 + [3])
    centres = torch.randn(C, D, generator=gen) * 3
    feats = centres[labels] + torch.randn(len(labels), D, generator=gen)
    feats[5] = -centres[0] * 4  # the outlier of class 0
    return feats, labels


def test_class_radii_equal_the_official_class_meta():
    feats, labels = class_data()
    meta = official_class_meta(feats.double().numpy(), labels.numpy())
    centres, radii = class_radii(feats, labels, C)
    for k in range(C):
        np.testing.assert_allclose(centres[k].numpy(), meta[k]["center"], rtol=1e-5, atol=1e-6)
        expected = meta[k]["radius"][-1] if len(meta[k]["radius"]) > 1 else -1.0
        assert radii[k].item() == pytest.approx(expected, abs=1e-5), k
    assert len(meta[0]["radius"]) == 5  # the outlier was removed (the case exercises the IQR rule)
    assert radii[3].item() == -1.0  # single image: no boundary


def make_inputs(seed: int = 1, epoch: int = 3, progress: float | None = 0.25, seen=(True, True, True, False)):
    feats, labels_all = class_data()
    centres, radii = class_radii(feats, labels_all, C)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    new = (centres[labels] + 0.4 * torch.randn(B, D, generator=gen)).requires_grad_(True)
    old = torch.randn(B, D, generator=gen)
    inputs = CompatibleInputs(new_features=new, old_features=old, labels=labels, epoch=epoch, progress=progress,
                              max_epochs=10, extras={"old_means": centres, "old_radii": radii,
                                                     "old_seen": torch.tensor(seen)})
    return inputs, feats, labels_all


def test_loss_equals_the_official_boundary_loop_plus_the_decayed_discriminator_loss():
    torch.manual_seed(0)
    plugin = AdvBCTLoss(threshold=0.6, embedding_dim=D, num_classes=C)
    inputs, feats, labels_all = make_inputs()
    meta = official_class_meta(feats.double().numpy(), labels_all.numpy())
    meta = {k: v for k, v in meta.items() if k in (0, 1, 2)}  # the JSON holds the old classes only
    out = plugin(inputs)

    boundary = official_boundary(inputs.new_features.detach().double(), inputs.labels, meta,
                                 plugin.elastic.detach().double(), 0.6)
    disc = plugin.discriminator
    model_loss = (F.nll_loss(disc(inputs.new_features.detach()), torch.zeros(B, dtype=torch.long))
                  + F.nll_loss(disc(inputs.old_features), torch.ones(B, dtype=torch.long)))
    expected = boundary.item() + model_loss.item() * (10 - 3 + 1) / 10
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.parts["advbct/boundary"].item() == pytest.approx(boundary.item(), rel=1e-5)
    assert 0 < out.parts["advbct/violating_fraction"].item() < 1  # the case has violators and non-violators


def test_all_classes_also_bounds_classes_the_old_model_never_saw():
    torch.manual_seed(0)
    inputs, feats, labels_all = make_inputs(seen=(False, False, True, False))
    only_old = AdvBCTLoss(threshold=0.6, boundary_weight=1.0, adversarial_weight=0.0, embedding_dim=D, num_classes=C)
    every = AdvBCTLoss(threshold=0.6, adversarial_weight=0.0, classes="all", embedding_dim=D, num_classes=C)
    every.load_state_dict(only_old.state_dict())
    meta = official_class_meta(feats.double().numpy(), labels_all.numpy())
    elastic = only_old.elastic.detach().double()
    new = inputs.new_features.detach().double()
    want_old = official_boundary(new, inputs.labels, {2: meta[2]}, elastic, 0.6)
    want_all = official_boundary(new, inputs.labels, meta, elastic, 0.6)
    assert only_old(inputs).loss.item() == pytest.approx(want_old.item(), rel=1e-5)
    assert every(inputs).loss.item() == pytest.approx(want_all.item(), rel=1e-5)
    assert want_old.item() != pytest.approx(want_all.item())


def test_schedules_follow_the_official_formulas():
    assert grl_coefficient(0.0) == 0.0
    assert grl_coefficient(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert adversarial_weight(0, 30) == pytest.approx(31 / 30)  # epochs count from 0, as the official loop
    assert adversarial_weight(29, 30) == pytest.approx(2 / 30)
    plugin = AdvBCTLoss(embedding_dim=D, num_classes=C, max_epochs=30)
    inputs, _, _ = make_inputs(epoch=6, progress=None)
    inputs.max_epochs = None
    alpha, weight = plugin.schedule(inputs)  # without a trainer: p = epoch / E, E = the option
    assert alpha == pytest.approx(grl_coefficient(6 / 30)) and weight == pytest.approx(25 / 30)
    inputs.progress, inputs.max_epochs = 0.5, 10  # the host's values win
    alpha, weight = plugin.schedule(inputs)
    assert alpha == pytest.approx(grl_coefficient(0.5)) and weight == pytest.approx(5 / 10)
    inputs.max_epochs = None
    with pytest.raises(ValueError, match="max_epochs"):
        AdvBCTLoss(embedding_dim=D, num_classes=C).schedule(inputs)


def test_the_encoder_gets_the_reversed_discriminator_gradient_and_the_discriminator_the_plain_one():
    torch.manual_seed(0)
    plugin = AdvBCTLoss(boundary_weight=0.0, embedding_dim=D, num_classes=C)
    inputs, _, _ = make_inputs(epoch=2, progress=0.3)
    plugin(inputs).loss.backward()
    grad_feat = inputs.new_features.grad.clone()
    grad_disc = [p.grad.clone() for p in plugin.discriminator.parameters()]

    # reference: the same loss without the reversal layer, differentiated by autograd
    plugin.zero_grad()
    feats = inputs.new_features.detach().clone().requires_grad_(True)
    d = plugin.discriminator
    plain = (F.nll_loss(d(feats), torch.zeros(B, dtype=torch.long))
             + F.nll_loss(d(inputs.old_features), torch.ones(B, dtype=torch.long))) * (10 - 2 + 1) / 10
    plain.backward()
    alpha = grl_coefficient(0.3)
    torch.testing.assert_close(grad_feat, -alpha * feats.grad)
    for got, p in zip(grad_disc, d.parameters()):
        torch.testing.assert_close(got, p.grad)


def test_elastic_scalars_widen_a_tight_boundary_towards_the_threshold():
    torch.manual_seed(0)
    plugin = AdvBCTLoss(threshold=1.5, adversarial_weight=0.0, embedding_dim=D, num_classes=C)
    inputs, _, _ = make_inputs()
    radii = inputs.extras["old_radii"]
    expected = radii + torch.sigmoid(plugin.elastic.detach()) * (1.5 - radii)  # r < T: r + σ(w)|r - T|
    torch.testing.assert_close(plugin.elastic_radii(radii).detach(), expected)
    plugin(inputs).loss.backward()
    grad = plugin.elastic.grad
    assert (grad[:3] <= 0).all() and grad[:3].sum() < 0  # gradient descent raises w: the radius grows to T
    assert grad[3] == 0  # an unseen class has no boundary


def test_bind_checks_the_upgrade_dimensions():
    plugin = AdvBCTLoss()
    with pytest.raises(RuntimeError, match="no discriminator"):
        plugin(make_inputs()[0])
    with pytest.raises(ValueError, match="num_classes option"):
        plugin.bind(old_dim=D, new_dim=D, num_classes=0)
    plugin.bind(old_dim=D, new_dim=7, num_classes=C)
    assert plugin.discriminator[0].in_features == D and plugin.elastic.shape == (C,)
    with pytest.raises(ValueError, match="C_new=9"):
        AdvBCTLoss(embedding_dim=D, num_classes=C).bind(old_dim=D, new_dim=D, num_classes=9)
