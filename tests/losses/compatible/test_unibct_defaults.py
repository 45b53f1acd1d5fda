"""UniBCT's structural refinement with its defaults: the published hyper-parameters, not just any alpha.

Zhang et al., IJCAI 2022 (arXiv 2203.01583) Eq. 9-10, with the values of the public code (yuleung/MixBCT
``BCT_Methods/UniBCT/refine_prototype.py``): alpha = 0.9, tau = 0.05. The host refines without naming them
(``ClassLevelState.refine``), so the defaults are what every UniBCT study trains with.
"""

from __future__ import annotations

import numpy as np
import torch

from reid_lab.losses.compatible.prototypes import refine_prototypes
from reid_lab.upgrade.class_state import ClassLevelState
from tests.losses.compatible.test_prototypes import numpy_refine

MIXBCT_ALPHA, MIXBCT_TAU = 0.9, 0.05


def _case():
    """Four classes of five images, 6-d old and 8-d new features; new features near their class direction
    so the intra-class graph is far from uniform and the propagation weight alpha matters."""
    gen = torch.Generator().manual_seed(4)
    labels = torch.arange(4).repeat_interleave(5)
    old = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    new = torch.randn(4, 8, generator=gen, dtype=torch.float64)[labels] + 0.7 * torch.randn(
        20, 8, generator=gen, dtype=torch.float64)
    return old, new, labels


def test_refinement_defaults_are_the_published_alpha_and_tau() -> None:
    old, new, labels = _case()
    expected = numpy_refine(old.numpy(), new.numpy(), labels.numpy(), 4, MIXBCT_ALPHA, MIXBCT_TAU)
    for alpha in (0.5, 0.8, 0.95, 0.99):  # the case tells alpha = 0.9 from its neighbours
        other = numpy_refine(old.numpy(), new.numpy(), labels.numpy(), 4, alpha, MIXBCT_TAU)
        assert np.abs(other - expected).max() > 1e-3, alpha
    torch.testing.assert_close(refine_prototypes(old, new, labels, 4), torch.from_numpy(expected))


def test_the_hosts_refinement_uses_the_published_alpha_and_tau() -> None:
    old, new, labels = _case()
    state = ClassLevelState({"prototypes"}, refresh=True)
    state.prepare(old, labels, torch.full((4,), -1), None, 0)
    state.refine(new, epoch=10)
    expected = numpy_refine(old.numpy(), new.numpy(), labels.numpy(), 4, MIXBCT_ALPHA, MIXBCT_TAU)
    torch.testing.assert_close(state.prototypes, torch.from_numpy(expected))
    assert state.refreshed_epochs == [10]
