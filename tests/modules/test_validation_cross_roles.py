"""The validation cross-test of an upgrade ranks *new* queries against the *old* gallery, not the reverse.

Compatibility is M(φ_new, φ_old): queries embedded by the new model, gallery by the old one (BCT, Shen et al.
CVPR'20; reference/compatible-learning.md §2). The constructed case gives a different mAP in each direction;
the logged value is checked against a naive mAP computed here from independently embedded features.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from reid_lab.modules.reid import ReIDModule

NUM_IDS, GALLERY_PER_ID = 4, 3
# One query per identity on camera 0, its gallery images on camera 1: no gallery item is same-camera junk.
PIDS = list(range(NUM_IDS)) + [p for p in range(NUM_IDS) for _ in range(GALLERY_PER_ID)]
IS_QUERY = [True] * NUM_IDS + [False] * (NUM_IDS * GALLERY_PER_ID)
CAMIDS = [0 if q else 1 for q in IS_QUERY]
IMAGES = torch.randn(len(PIDS), 3, 32, 16, generator=torch.Generator().manual_seed(4))


def naive_map(query: torch.Tensor, q_pids: list[int], gallery: torch.Tensor, g_pids: list[int]) -> float:
    """mAP in percent by cosine similarity: mean over queries of the mean precision at each true match."""
    sims = F.normalize(query, dim=1) @ F.normalize(gallery, dim=1).T
    aps = []
    for i, pid in enumerate(q_pids):
        ranked = [g_pids[j] for j in torch.argsort(sims[i], descending=True).tolist()]
        hits, precisions = 0, []
        for rank, g in enumerate(ranked, start=1):
            if g == pid:
                hits += 1
                precisions.append(hits / rank)
        aps.append(sum(precisions) / len(precisions))
    return 100.0 * sum(aps) / len(aps)


def _loader():
    items = [{"image": IMAGES[i], "pid": PIDS[i], "camid": CAMIDS[i], "is_query": IS_QUERY[i]}
             for i in range(len(PIDS))]
    return DataLoader(items, batch_size=7)  # batches mix queries and gallery items


def test_the_validation_cross_test_ranks_new_queries_against_the_old_gallery(old_checkpoint):
    torch.manual_seed(1)
    module = ReIDModule(backbone="resnet18", num_classes=NUM_IDS, last_stride=2,
                        upgrade={"old_checkpoint": str(old_checkpoint), "compatible_losses": []})
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(module, dataloaders=_loader(), verbose=False)[0]
    cross = sorted((k for k in logged if "cross" in k.lower() and "map" in k.lower()), key=len)
    assert cross, f"no cross-test mAP among the logged metrics {sorted(logged)}"

    with torch.no_grad():  # φ_old as the host loaded it (its loading is tested in tests/upgrade/test_host.py)
        new = module.encoder.eval()(IMAGES)["embedding"]
        old = module.host.old.encoder.eval()(IMAGES)["embedding"]
    nq = NUM_IDS
    q_pids, g_pids = PIDS[:nq], PIDS[nq:]
    new_to_old = naive_map(new[:nq], q_pids, old[nq:], g_pids)
    old_to_new = naive_map(old[:nq], q_pids, new[nq:], g_pids)
    assert abs(new_to_old - old_to_new) > 5.0  # the case tells the two directions apart
    assert abs(float(logged[cross[0]]) - new_to_old) < 1e-2, (cross[0], logged[cross[0]], new_to_old, old_to_new)
