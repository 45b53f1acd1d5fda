"""What an upgrade study adds to its wandb report run, besides the tables and plots of :mod:`.report`.

* ``upgrade/tables/flipped_queries``: per method, its negatively flipped queries (right at rank 1 in the old
  system, wrong when the new model's query searches the old gallery) with the query's thumbnail and both
  ranked lists as one picture (:mod:`reid_lab.studies.ranked_render`), the query's AP in each system;
* the resolved config of every trained stage (``train/<version>/config.yaml``) in the run's config;
* with ``artifacts``: the feature files (``features/*.pt``) and the selected checkpoints of each stage as wandb
  artifacts (type ``features`` / ``model``), named by study and version. Off by default: they are large.

Offline (the default) all of it lands in the run's folder; ``wandb sync`` uploads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from reid_lab.embedding.features import FeatureSet
from reid_lab.studies.ranked_lists import as_feature_sets, compare_systems
from reid_lab.studies.ranked_render import grid_image, query_picture

FLIP_COLUMNS = ["method", "query", "item", "query_image", "AP_old", "AP_cross", "ranked"]


def flipped_query_rows(study: Path, rows: Sequence[Mapping[str, Any]], per_method: int = 5,
                       top_k: int = 5) -> list[list[Any]]:
    """Table rows (:data:`FLIP_COLUMNS`, pictures as PIL images) of each method's first flipped queries."""
    out: list[list[Any]] = []
    cache: dict[str, tuple[FeatureSet, FeatureSet]] = {}
    for row in rows:
        old, new = row.get("old"), row.get("new")
        paths = {v: study / "features" / f"{v}.pt" for v in (old, new) if v}
        if not old or not new or old == new or not all(p.is_file() for p in paths.values()):
            continue
        for v, p in paths.items():
            cache.setdefault(v, as_feature_sets(FeatureSet.load(p)))
        (old_q, old_g), (new_q, _) = cache[old], cache[new]
        if new_q.features.shape[1] != old_g.features.shape[1]:
            continue
        ref, cross = f"{old} -> {old}", f"{new} -> {old}"
        comparisons = compare_systems({ref: (old_q, old_g), cross: (new_q, old_g)}, ref, top_k)
        for c in [c for c in comparisons if c.flipped][:per_method]:
            a, b = c.lists[ref], c.lists[cross]
            out.append([row["method"], c.query, a.item, query_picture(a, (96, 48)), round(100 * a.ap, 2),
                        None if not b.valid or math.isnan(b.ap) else round(100 * b.ap, 2),
                        grid_image([(ref, a), (cross, b)])])
    return out


def stage_configs(study: Path) -> dict[str, Any]:
    """``{version: resolved config}`` of every trained stage of the study."""
    return {p.parent.name: yaml.safe_load(p.read_text()) for p in sorted((study / "train").glob("*/config.yaml"))}


def log_study_extras(run: Any, study: str | Path, rows: Sequence[Mapping[str, Any]], *, artifacts: bool = False,
                     name: str | None = None, per_method: int = 5) -> dict[str, int]:
    """Log the flipped-queries table, the stage configs and (with ``artifacts``) features and checkpoints.

    Returns:
        ``{"flipped_rows": ..., "artifacts": ...}``: how many table rows and artifacts were logged.
    """
    import wandb

    study = Path(study)
    name = name or study.name
    run.config.update({"stages": stage_configs(study)}, allow_val_change=True)
    table_rows = flipped_query_rows(study, rows, per_method)
    table = wandb.Table(columns=FLIP_COLUMNS, data=[
        [m, q, item, wandb.Image(query), ap_old, ap_cross, wandb.Image(ranked, caption=f"{m}: query {q}")]
        for m, q, item, query, ap_old, ap_cross, ranked in table_rows])
    run.log({"upgrade/tables/flipped_queries": table})
    logged = 0
    if artifacts:
        for path in sorted((study / "features").glob("*.pt")):
            artifact = wandb.Artifact(f"{name}-features-{path.stem.replace('.', '-')}", type="features",
                                      metadata={"study": name, "file": path.name})
            artifact.add_file(str(path))
            run.log_artifact(artifact)
            logged += 1
        for stage in sorted((study / "train").iterdir()) if (study / "train").is_dir() else []:
            selected = [p for p in sorted((stage / "checkpoints").glob("*.ckpt")) if p.name != "last.ckpt"]
            if not selected:
                continue
            artifact = wandb.Artifact(f"{name}-model-{stage.name}", type="model",
                                      metadata={"study": name, "version": stage.name})
            for ckpt in selected:
                artifact.add_file(str(ckpt))
            run.log_artifact(artifact)
            logged += 1
    return {"flipped_rows": len(table_rows), "artifacts": logged}
