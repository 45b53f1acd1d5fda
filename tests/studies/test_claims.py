"""Chance level of a study's queries and gallery, and the claim rule built on it."""

from __future__ import annotations

import math

import pytest
import torch

from reid_lab.embedding.space import add_claim, make_space
from reid_lab.studies.claims import chance_level


def test_chance_level_matches_the_expected_ap_of_a_random_ranking():
    """One positive among N kept gallery items, ranked uniformly at random: E[AP] = E[1/rank] = H_N / N."""
    num_query, num_gallery = 400, 50
    q_pids = torch.arange(num_query)
    # gallery: one positive per query pid 0..49 would not cover 400 queries, so queries share 50 identities
    q_pids = q_pids % num_gallery
    g_pids = torch.arange(num_gallery)
    q_camids, g_camids = torch.zeros(num_query, dtype=torch.long), torch.ones(num_gallery, dtype=torch.long)
    mean, std = chance_level(q_pids, g_pids, q_camids, g_camids, draws=5)
    expected = 100 * sum(1 / k for k in range(1, num_gallery + 1)) / num_gallery
    # per-query AP has variance ~ (E[1/r^2] - E[1/r]^2); the mean over 2,000 draws is within ~0.5 points
    assert mean == pytest.approx(expected, abs=0.6)
    assert 0 < std < 1.0
    assert not math.isnan(std)


def test_a_claim_needs_the_margin_and_a_distance_from_chance():
    old = make_space("r18", 4, state_dict={"w": torch.zeros(1)})
    new = make_space("r34", 4, state_dict={"w": torch.ones(1)})
    with pytest.raises(ValueError, match="by the margin 1.00"):
        add_claim(dict(new, claims=[]), old, metric="mAP", cross=3.38, reference=2.93, margin=1.0)
    with pytest.raises(ValueError, match="within 1.50 of chance"):  # the independent model of the issue
        add_claim(dict(new, claims=[]), old, metric="mAP", cross=3.38, reference=1.0, margin=1.0,
                  chance=2.5, chance_margin=1.5)
    space = add_claim(dict(new, claims=[]), old, metric="mAP", cross=20.0, reference=11.6, margin=1.0,
                      chance=2.5, chance_margin=1.5, split="test")
    claim = space["claims"][0]
    assert (claim["cross"], claim["reference"], claim["margin"], claim["chance"], claim["split"]) == (
        20.0, 11.6, 1.0, 2.5, "test")
