"""Round-robin hot refresh: the uncertainty order taken in rounds over groups (gallery identities or clusters)."""

from __future__ import annotations

import torch

from reid_lab.metrics.backfill import old_feature_groups, order_by_uncertainty, order_round_robin


def _naive(scores: list[float], groups: list[int]) -> list[int]:
    """Written from the definition: per group its items by score (descending, ties by index); round r takes the
    r-th item of every group that has one, the round's items by score (descending, ties by index)."""
    members: dict[int, list[int]] = {}
    for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        members.setdefault(groups[i], []).append(i)
    out, r = [], 0
    while len(out) < len(scores):
        round_items = [items[r] for items in members.values() if r < len(items)]
        out += sorted(round_items, key=lambda i: (-scores[i], i))
        r += 1
    return out


def test_round_robin_equals_the_naive_definition_with_ties_and_uneven_groups():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(1, 60, (1,), generator=generator))
        scores = torch.randint(0, 5, (n,), generator=generator).float()  # many ties
        groups = torch.randint(0, 7, (n,), generator=generator)
        assert order_round_robin(scores, groups).tolist() == _naive(scores.tolist(), groups.tolist())


def test_every_identity_refreshes_at_the_same_pace_unlike_the_plain_uncertainty_order():
    """The case the study found: uncertainty shared within an identity refreshes whole identities first."""
    pids = torch.arange(10).repeat_interleave(4)  # 10 identities x 4 images
    scores = pids.float() + 0.01 * torch.rand(40, generator=torch.Generator().manual_seed(1))
    plain, rr = order_by_uncertainty(scores), order_round_robin(scores, pids)
    assert set(pids[plain[:4]].tolist()) == {9}  # the first 10 % refresh one identity whole
    for prefix in (10, 20, 30):
        counts = torch.bincount(pids[rr[:prefix]], minlength=10)
        assert counts.max() - counts.min() == 0  # each round refreshes one image of every identity
    assert pids[rr[:10]].tolist() == list(range(9, -1, -1))  # inside a round: most uncertain identity first


def test_old_feature_groups_recover_well_separated_identities():
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(5, 32, generator=generator), dim=1)
    pids = torch.arange(5).repeat_interleave(6)
    features = centres[pids] + 0.02 * torch.randn(30, 32, generator=generator)
    groups = old_feature_groups(features, 5)
    # the same partition as the identities (cluster numbers are arbitrary)
    assert all(len(set(groups[pids == p].tolist())) == 1 for p in range(5))
    assert len(set(groups.tolist())) == 5
