"""Embedding spaces: which model produced a vector, and which other spaces it is verified compatible with.

Every checkpoint and feature file carries a space record::

    {"space_id": "bot_r18-old-3f2a9c1e", "model": "resnet18", "parent": None, "dim": 512,
     "normalized": True, "distance": "cosine",
     "claims": [{"gallery_space": "...", "metric": "mAP", "cross": 61.2, "reference": 58.3,
                 "criterion": "M(new, old) > M(old, old)", "dataset": "synthetic"}]}

A *claim* says that queries embedded in this space may search a gallery embedded in ``gallery_space``; it
is only recorded after the empirical criterion of BCT (Shen et al. CVPR'20), M(φ_new, φ_old) > M(φ_old,
φ_old), was measured to hold. Searching a gallery of another space without such a claim is an error, not
a silent wrong answer; ``allow_unverified=True`` is the explicit override for experiments.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


class IncompatibleSpacesError(RuntimeError):
    """Query and gallery features live in spaces with no verified compatibility claim."""


def make_space(
    model: str,
    dim: int,
    *,
    space_id: str | None = None,
    parent: str | None = None,
    normalized: bool = True,
    distance: str = "cosine",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """A new space record; without ``space_id`` one is derived from ``model`` and a hash of the weights."""
    if space_id is None:
        digest = weights_digest(state_dict) if state_dict is not None else "unhashed"
        space_id = f"{model.replace(':', '-')}-{dim}d-{digest}"
    return {
        "space_id": space_id,
        "model": model,
        "parent": parent,
        "dim": int(dim),
        "normalized": bool(normalized),
        "distance": distance,
        "claims": [],
    }


def weights_digest(state_dict: dict[str, torch.Tensor], length: int = 8) -> str:
    """A short content hash of a state dict (names, shapes and values)."""
    h = hashlib.sha1()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not torch.is_tensor(tensor):
            continue
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).to(torch.float64).numpy().tobytes()[:4096])
        h.update(str(float(tensor.detach().double().sum())).encode())
    return h.hexdigest()[:length]


def add_claim(space: dict[str, Any], gallery_space: dict[str, Any], *, metric: str, cross: float,
              reference: float, dataset: str = "") -> dict[str, Any]:
    """Record that ``space`` queries can search ``gallery_space`` galleries, if the criterion holds.

    Args:
        space: the query (new) space record; updated in place and returned.
        gallery_space: the gallery (old) space record.
        metric: metric name, e.g. ``"mAP"``.
        cross: M(new query, old gallery).
        reference: M(old query, old gallery).
        dataset: where it was measured.

    Raises:
        ValueError: the criterion ``cross > reference`` does not hold (no claim is recorded).
    """
    if not cross > reference:
        raise ValueError(
            f"cannot claim {space['space_id']} compatible with {gallery_space['space_id']}: "
            f"cross-test {metric} {cross:.2f} is not above the old self-test {reference:.2f}"
        )
    if space["dim"] != gallery_space["dim"]:
        raise ValueError(f"spaces have different dims ({space['dim']} vs {gallery_space['dim']})")
    claim = {
        "gallery_space": gallery_space["space_id"],
        "metric": metric,
        "cross": float(cross),
        "reference": float(reference),
        "criterion": "M(new, old) > M(old, old)",
        "dataset": dataset,
    }
    space["claims"] = [c for c in space.get("claims", []) if c["gallery_space"] != claim["gallery_space"]]
    space["claims"].append(claim)
    return space


def check_compatible(query_space: dict[str, Any] | None, gallery_space: dict[str, Any] | None,
                     *, allow_unverified: bool = False) -> None:
    """Raise unless queries of ``query_space`` may search a gallery of ``gallery_space``.

    Allowed: the same space id, or a claim of the query space naming the gallery space. Feature files
    without a space record (older or hand-made files) are only accepted with ``allow_unverified``.
    """
    if query_space and gallery_space and query_space.get("space_id") == gallery_space.get("space_id"):
        return
    q_id = (query_space or {}).get("space_id", "<unknown>")
    g_id = (gallery_space or {}).get("space_id", "<unknown>")
    claims = {c.get("gallery_space") for c in (query_space or {}).get("claims", [])}
    if query_space and gallery_space and g_id in claims:
        return
    if query_space and gallery_space and query_space.get("dim") != gallery_space.get("dim"):
        reason = f"their dimensions differ ({query_space.get('dim')} vs {gallery_space.get('dim')})"
    elif not query_space or not gallery_space:
        reason = "one side carries no embedding-space record"
    else:
        reason = f"{q_id} has no verified compatibility claim on {g_id} (claims: {sorted(claims) or 'none'})"
    message = (
        f"refusing to search a gallery of space {g_id!r} with queries of space {q_id!r}: {reason}. "
        "Train the new model with a compatible loss and verify it (reid-lab upgrade), re-embed the gallery, "
        "or pass allow_unverified=True for an experiment."
    )
    if not allow_unverified:
        raise IncompatibleSpacesError(message)
    log.warning("allow_unverified: %s", message)
