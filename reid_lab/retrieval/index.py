"""Gallery indexes: faiss search over L2-normalised gallery embeddings, with the gallery's pids and space.

A :class:`GalleryIndex` keeps a faiss index whose inner product is the cosine similarity (every vector is
L2-normalised on the way in) together with what a search result needs to be read: the gallery pids,
camids (and whether they are known: they decide the evaluation protocol of a search), image paths and the
embedding-space record (``reid_lab.embedding.space``). :meth:`GalleryIndex.source_mismatch` tells whether a
feature file is the one the index was built from. Kinds:

- ``"flat"``: ``IndexFlatIP``, exact.
- ``"ivf"``: ``IndexIVFFlat`` with ``nlist`` k-means cells trained on a sample; ``nprobe`` cells are
  visited per query (``nprobe == nlist`` is exact).
- ``"hnsw"``: ``IndexHNSWFlat`` (Malkov & Yashunin, TPAMI'18) with ``M`` links per node, ``ef_construction``
  and ``ef_search``; CPU only.
- ``"ivfpq"``: ``IndexIVFPQ``, product-quantised cells (Jégou et al., TPAMI'11); ``pq_m`` sub-quantisers of
  ``nbits`` bits, for galleries that do not fit in memory as float32.

On disk an index is a folder holding ``index.faiss`` (``faiss.write_index``) and ``meta.pt``; the folder is
written under a temporary name next to the target and renamed into place. :func:`torch_search` is the
exact brute-force path (chunked matrix multiply + top-k) that the approximate kinds are measured against;
it runs on whatever device its inputs are on.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor

from reid_lab.atomic import umask
from reid_lab.embedding.features import FeatureSet

log = logging.getLogger(__name__)

FORMAT = "reid_lab.gallery_index/1"
KINDS = ("flat", "ivf", "hnsw", "ivfpq")
DEVICES = ("auto", "cpu", "gpu")
INDEX_FILE = "index.faiss"
META_FILE = "meta.pt"

_PARAMS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf": ("nlist", "nprobe", "train_size"),
    "hnsw": ("m", "ef_construction", "ef_search"),
    "ivfpq": ("nlist", "nprobe", "train_size", "pq_m", "nbits"),
}


def l2_normalize(x: Tensor | np.ndarray) -> Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero).

    Args:
        x: ``(N, D)`` embeddings.

    Returns:
        ``(N, D)`` float32 tensor on the input's device.
    """
    x = torch.as_tensor(x).float()
    return torch.nn.functional.normalize(x, dim=1)


def torch_search(queries: Tensor, gallery: Tensor, k: int, chunk_size: int = 65536) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner-product search by chunked matrix multiply.

    The gallery is visited in blocks of ``chunk_size`` rows and the running top-``k`` is merged with each
    block's, so memory stays at ``num_query x (chunk_size + k)`` scores whatever the gallery size. Inputs are
    used as given (normalise them first for cosine similarity). Runs on the device of ``queries``.

    Args:
        queries: ``(num_query, D)``.
        gallery: ``(num_gallery, D)``.
        k: neighbours per query, ``1 <= k <= num_gallery``.
        chunk_size: gallery rows per block.

    Returns:
        ``scores`` ``(num_query, k)`` float32, descending per row, and ``ids`` ``(num_query, k)`` int64 rows of
        ``gallery``.

    Example:
        >>> g = torch.eye(3)
        >>> torch_search(torch.tensor([[0.0, 1.0, 0.1]]), g, k=2)[1].tolist()
        [[1, 2]]
    """
    if queries.ndim != 2 or gallery.ndim != 2:
        raise ValueError(f"torch_search expects 2-d queries and gallery, got {tuple(queries.shape)} and "
                         f"{tuple(gallery.shape)}")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]} but the gallery has dim {gallery.shape[1]}")
    n = gallery.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the gallery size {n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device = queries.device
    queries = queries.float()
    best_scores = torch.full((queries.shape[0], 0), float("-inf"), device=device)
    best_ids = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=device)
    for start in range(0, n, chunk_size):
        block = gallery[start:start + chunk_size].to(device=device, dtype=torch.float32)
        sims = queries @ block.T
        top = torch.topk(sims, min(k, sims.shape[1]), dim=1)
        scores = torch.cat([best_scores, top.values], dim=1)
        ids = torch.cat([best_ids, top.indices + start], dim=1)
        keep = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        best_scores, best_ids = keep.values, torch.gather(ids, 1, keep.indices)
    return best_scores, best_ids


def _as_features(features: FeatureSet | Tensor | np.ndarray, what: str) -> tuple[Tensor, FeatureSet | None]:
    if isinstance(features, FeatureSet):
        x = features.features
    else:
        x = torch.as_tensor(features)
        features = None
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty (N, D) matrix, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"{what} hold NaN or infinite values in {bad} of {x.shape[0]} rows")
    return x, features


def _use_gpu(device: str, kind: str) -> bool:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "gpu":
        if gpus == 0:
            raise RuntimeError("device='gpu' but this faiss build sees no GPU (faiss-cpu, or no CUDA device)")
        if kind == "hnsw":
            raise ValueError("faiss has no GPU HNSW index; use device='cpu' (or 'auto') for kind='hnsw'")
        return True
    return device == "auto" and gpus > 0 and kind != "hnsw"


class GalleryIndex:
    """A faiss index over L2-normalised gallery embeddings, with the gallery's pids, camids, paths and space.

    Build one with :meth:`build`, grow it with :meth:`add`, query it with :meth:`search`, keep it with
    :meth:`save` / :meth:`load`. Row ``i`` of the index is gallery item ``i``: ``pids[i]``, ``paths[i]``.

    Args:
        index: a CPU or GPU faiss index with inner-product metric.
        kind: one of :data:`KINDS`.
        params: the resolved build/search parameters (``nlist``, ``nprobe``, ``m``, ``ef_search``, ...).
        space: embedding-space record of the gallery (``{}`` when unknown).
        pids: ``(ntotal,)`` int64 gallery pids (``-1`` when unknown).
        camids: ``(ntotal,)`` int64 gallery camids (``-1`` when unknown).
        paths: ``ntotal`` image paths (``""`` when unknown).
        has_camids: whether every item's camid is known (the features carried camids); ``None`` infers it
            from ``camids`` (all ``>= 0``), for index folders written before it was recorded.
    """

    def __init__(self, index: faiss.Index, kind: str, params: dict[str, Any], space: dict[str, Any] | None = None,
                 pids: Tensor | None = None, camids: Tensor | None = None, paths: list[str] | None = None,
                 has_camids: bool | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
        self.index = index
        self.kind = kind
        self.params = dict(params)
        self.space = dict(space or {})
        self.pids = torch.empty(0, dtype=torch.long) if pids is None else pids.long().cpu()
        self.camids = torch.empty(0, dtype=torch.long) if camids is None else camids.long().cpu()
        self.paths = [] if paths is None else list(paths)
        self.has_camids = bool((self.camids >= 0).all()) if has_camids is None else bool(has_camids)
        if not len(self.pids) == len(self.camids) == len(self.paths) == self.index.ntotal:
            raise ValueError(f"index holds {self.index.ntotal} vectors but {len(self.pids)} pids, "
                             f"{len(self.camids)} camids and {len(self.paths)} paths")

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, features: FeatureSet | Tensor | np.ndarray, kind: str = "flat", *, device: str = "auto",
              space: dict[str, Any] | None = None, chunk_size: int = 65536, seed: int = 0,
              **params: Any) -> GalleryIndex:
        """Index ``features`` (all rows: select the gallery part first, e.g. ``FeatureSet.split()[1]``).

        Args:
            features: a :class:`FeatureSet` (pids, camids, paths and space are kept) or an ``(N, D)`` matrix.
            kind: ``"flat"``, ``"ivf"``, ``"hnsw"`` or ``"ivfpq"``.
            device: ``"auto"`` (GPU if faiss sees one and the kind supports it), ``"cpu"`` or ``"gpu"``.
            space: embedding-space record; defaults to ``features.space`` for a FeatureSet.
            chunk_size: rows normalised and added per call to faiss.
            seed: seed of the training sample (ivf, ivfpq).
            **params: ``nlist`` (default ``4 sqrt(N)``, at most ``N / 39``), ``nprobe`` (default
                ``min(nlist, 32)``), ``train_size`` (default ``min(N, 64 nlist)``, for ivfpq at least
                ``64 * 2**nbits``; faiss asks for 39 to 256 per centroid), ``m`` (HNSW links, 32),
                ``ef_construction`` (80), ``ef_search`` (64), ``pq_m`` (sub-quantisers, must divide D; default
                ``D / 8`` rounded down to a divisor), ``nbits`` (8).

        Returns:
            The index, holding every row of ``features``.
        """
        x, fs = _as_features(features, "gallery features")
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
        unknown = set(params) - set(_PARAMS[kind])
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for kind={kind!r}; "
                             f"expected some of {list(_PARAMS[kind]) or 'none'}")
        n, dim = x.shape
        resolved = _resolve_params(kind, n, dim, params)
        gpu = _use_gpu(device, kind)
        index = _make_index(kind, dim, resolved)
        if kind in ("ivf", "ivfpq"):
            generator = torch.Generator().manual_seed(seed)
            sample = torch.randperm(n, generator=generator)[: resolved["train_size"]].sort().values
            train = x[sample].cpu().float()  # a copy: normalised in place to hold one sample in memory
            train = train.div_(train.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
            if gpu:
                index = _to_gpu(index)
            index.train(train)
            del train
        elif gpu:
            index = _to_gpu(index)
        out = cls(index, kind, resolved, space if space is not None else (fs.space if fs is not None else {}))
        out.params["device"] = "gpu" if gpu else "cpu"
        out._apply_search_params()
        out.add(features, chunk_size=chunk_size)
        return out

    def add(self, features: FeatureSet | Tensor | np.ndarray, *, pids: Tensor | None = None,
            camids: Tensor | None = None, paths: list[str] | None = None, chunk_size: int = 65536) -> None:
        """Append gallery items, ``chunk_size`` rows at a time (normalised on the way in).

        Args:
            features: a :class:`FeatureSet` or an ``(N, D)`` matrix.
            pids, camids, paths: metadata for a plain matrix (``-1`` / ``""`` when omitted); ignored for a
                FeatureSet, which brings its own.
            chunk_size: rows per ``faiss.Index.add`` call, so only one normalised chunk is held at a time.
        """
        x, fs = _as_features(features, "gallery features")
        n = x.shape[0]
        if x.shape[1] != self.dim:
            raise ValueError(f"cannot add vectors of dim {x.shape[1]} to an index of dim {self.dim}")
        if fs is not None:
            pids, camids, paths = fs.pids, fs.camids, fs.paths
        # Items without camids make the whole gallery's cameras unknown: a search then cannot drop
        # same-camera junk (ReID protocol) and falls back to the cross-modal protocol.
        has_camids = camids is not None
        pids = torch.full((n,), -1, dtype=torch.long) if pids is None else torch.as_tensor(pids).long()
        camids = torch.full((n,), -1, dtype=torch.long) if camids is None else torch.as_tensor(camids).long()
        paths = [""] * n if paths is None else list(paths)
        if not len(pids) == len(camids) == len(paths) == n:
            raise ValueError(f"{n} vectors but {len(pids)} pids, {len(camids)} camids, {len(paths)} paths")
        for start in range(0, n, chunk_size):
            self.index.add(np.ascontiguousarray(l2_normalize(x[start:start + chunk_size].cpu()).numpy()))
        self.pids = torch.cat([self.pids, pids.cpu()])
        self.camids = torch.cat([self.camids, camids.cpu()])
        self.paths.extend(paths)
        self.has_camids = self.has_camids and has_camids

    # ------------------------------------------------------------------ searching
    @property
    def dim(self) -> int:
        """Embedding dimension ``D``."""
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        """Number of gallery vectors held."""
        return int(self.index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.params.items() if k != "train_size"}
        return (f"GalleryIndex(kind={self.kind!r}, ntotal={self.ntotal}, dim={self.dim}, "
                f"space={self.space.get('space_id', '<unknown>')!r}, params={shown})")

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the speed/recall trade-off: ``nprobe`` (ivf, ivfpq) or ``ef_search`` (hnsw)."""
        if nprobe is not None:
            if self.kind not in ("ivf", "ivfpq"):
                raise ValueError(f"nprobe applies to ivf/ivfpq indexes, not {self.kind!r}")
            if nprobe < 1:
                raise ValueError(f"nprobe must be positive, got {nprobe}")
            self.params["nprobe"] = min(int(nprobe), self.params["nlist"])
        if ef_search is not None:
            if self.kind != "hnsw":
                raise ValueError(f"ef_search applies to hnsw indexes, not {self.kind!r}")
            if ef_search < 1:
                raise ValueError(f"ef_search must be positive, got {ef_search}")
            self.params["ef_search"] = int(ef_search)
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        if self.kind in ("ivf", "ivfpq"):
            gpu = self.params.get("device") == "gpu"  # GpuIndexIVF carries nprobe itself
            ivf = self.index if gpu else faiss.extract_index_ivf(self.index)
            ivf.nprobe = self.params["nprobe"]
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = self.params["ef_search"]

    def search(self, queries: Tensor | np.ndarray, k: int = 10) -> tuple[Tensor, Tensor]:
        """Top-``k`` gallery items by cosine similarity.

        Args:
            queries: ``(num_query, D)`` embeddings (normalised here).
            k: neighbours per query, ``1 <= k <= ntotal``.

        Returns:
            ``scores`` ``(num_query, k)`` float32 cosine similarities, descending, and ``ids``
            ``(num_query, k)`` int64 gallery rows. Approximate kinds return id ``-1`` (score ``-inf``) where the
            visited cells held fewer than ``k`` vectors.
        """
        q, _ = _as_features(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (num_query, {self.dim}), got {tuple(q.shape)}")
        if not 1 <= k <= self.ntotal:
            raise ValueError(f"k={k} must be between 1 and the gallery size {self.ntotal}")
        scores, ids = self.index.search(np.ascontiguousarray(l2_normalize(q.cpu()).numpy()), k)
        scores, ids = torch.from_numpy(scores), torch.from_numpy(ids).long()
        scores[ids < 0] = float("-inf")
        return scores, ids

    def source_mismatch(self, features: FeatureSet, *, sample: int = 1024) -> str | None:
        """How ``features`` differs from what this index was built from, or ``None`` when nothing tells them apart.

        Compared: the embedding-space id, the shape, row by row the items (paths), pids and camids the index
        recorded, and, for kinds that store the vectors themselves (``flat``, ``hnsw`` on CPU), up to ``sample``
        evenly spread rows of the normalised vectors. Row ``i`` of an exact search over ``features`` must be
        gallery item ``i`` of the index for the two searches to be comparable.

        Args:
            features: the candidate source, ``(ntotal, dim)`` rows in index order.
            sample: rows whose vectors are compared (the index's copy is reconstructed row by row).

        Returns:
            A sentence naming the first difference, or ``None``.
        """
        space_id = features.space.get("space_id")
        if space_id != self.space.get("space_id"):
            return f"its embedding space is {space_id!r}, the index's is {self.space.get('space_id')!r}"
        if tuple(features.features.shape) != (self.ntotal, self.dim):
            return (f"it holds {tuple(features.features.shape)} features, the index ({self.ntotal}, {self.dim})")
        paths = features.items
        if len(paths) == self.ntotal and any(self.paths) and paths != self.paths:
            row = next(i for i, (a, b) in enumerate(zip(paths, self.paths)) if a != b)
            return f"its row {row} is {paths[row]!r}, the index's row {row} is {self.paths[row]!r}"
        if not torch.equal(features.pids.long().cpu(), self.pids):
            row = int(torch.nonzero(features.pids.long().cpu() != self.pids)[0])
            return f"its row {row} has pid {int(features.pids[row])}, the index's row {row} pid {int(self.pids[row])}"
        if (features.camids is not None) != self.has_camids:
            return ("it carries camids, the index's gallery has none" if features.camids is not None
                    else "it carries no camids, the index's gallery has them")
        if features.camids is not None and not torch.equal(features.camids.long().cpu(), self.camids):
            row = int(torch.nonzero(features.camids.long().cpu() != self.camids)[0])
            return (f"its row {row} has camid {int(features.camids[row])}, the index's row {row} camid "
                    f"{int(self.camids[row])}")
        if self.kind in ("flat", "hnsw") and self.params.get("device") != "gpu":
            rows = torch.linspace(0, self.ntotal - 1, min(sample, self.ntotal)).round().long().unique()
            stored = torch.from_numpy(np.stack([self.index.reconstruct(int(i)) for i in rows.tolist()]))
            given = l2_normalize(features.features[rows].cpu())
            far = (stored - given).abs().amax(dim=1) > 1e-4  # float32 normalisation, not another vector
            if bool(far.any()):
                row = int(rows[far][0])
                return f"its row {row} holds another vector than the index's row {row}"
        return None

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` and ``meta.pt`` into ``directory``, atomically.

        Both files go into a temporary folder next to ``directory`` that is then renamed into place; an
        existing index folder at ``directory`` is moved aside first and then deleted (so a reader may briefly
        find no folder, never a half-written one). A non-empty folder that is not an index is refused.

        Returns:
            ``directory``.
        """
        directory = Path(directory)
        recover_interrupted_save(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"cannot save an index to {directory}: it exists and is not a folder")
        if directory.is_dir() and any(directory.iterdir()) and not (directory / META_FILE).is_file():
            raise ValueError(f"cannot save an index to {directory}: a non-empty folder that is not an index")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; the index should be as readable as other files
        old: Path | None = None
        try:
            cpu_index = faiss.index_gpu_to_cpu(self.index) if self.params.get("device") == "gpu" else self.index
            faiss.write_index(cpu_index, str(tmp / INDEX_FILE))
            meta = {
                "format": FORMAT,
                "kind": self.kind,
                "params": dict(self.params),
                "dim": self.dim,
                "ntotal": self.ntotal,
                "space": dict(self.space),
                "pids": self.pids.clone(),
                "camids": self.camids.clone(),
                "has_camids": self.has_camids,
                "paths": list(self.paths),
            }
            torch.save(meta, tmp / META_FILE)
            if directory.is_dir() and any(directory.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
                os.replace(directory, old / "index")
            os.replace(tmp, directory)
        except BaseException:
            if old is not None and not directory.exists():
                os.replace(old / "index", directory)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> GalleryIndex:
        """Read an index folder written by :meth:`save`.

        Args:
            directory: folder with ``index.faiss`` and ``meta.pt``.
            device: ``"cpu"``, ``"gpu"`` or ``"auto"`` (GPU when faiss sees one and the kind supports it).
        """
        directory = Path(directory)
        recover_interrupted_save(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"index folder {directory} does not exist")
        for name in (INDEX_FILE, META_FILE):
            if not (directory / name).is_file():
                raise ValueError(f"{directory} is not a reid_lab index folder: {name} is missing")
        try:
            meta = torch.load(directory / META_FILE, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ValueError(f"{directory / META_FILE} is not readable as a reid_lab index meta file: {err}") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{directory / META_FILE} is not a reid_lab index meta file (expected format {FORMAT!r})")
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
        except RuntimeError as err:
            raise ValueError(f"{directory / INDEX_FILE} is not a readable faiss index: {err}") from err
        if index.ntotal != meta["ntotal"] or index.d != meta["dim"]:
            raise ValueError(f"{directory}: index.faiss holds {index.ntotal} x {index.d} vectors but meta.pt "
                             f"describes {meta['ntotal']} x {meta['dim']}")
        params = dict(meta["params"])
        gpu = _use_gpu(device, meta["kind"])
        if gpu:
            index = _to_gpu(index)
        params["device"] = "gpu" if gpu else "cpu"
        out = cls(index, meta["kind"], params, meta["space"], meta["pids"], meta["camids"], meta["paths"],
                  meta.get("has_camids"))
        out._apply_search_params()
        return out


def recover_interrupted_save(directory: Path) -> None:
    """Undo what a killed :meth:`GalleryIndex.save` left next to ``directory``.

    A save moves the previous index to ``.<name>.*.old/index`` and then renames the new one into place; killed
    between the two renames, no index is at ``directory``. The previous one is moved back (old or new, never
    neither), leftover ``.old`` folders of a finished save are removed, and unfinished ``.tmp`` folders
    (written before the kill, never renamed) are removed with a warning that names them.
    """
    parent = directory.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{directory.name}.*.old"), key=lambda p: p.stat().st_mtime)
    if not directory.exists():
        for old in reversed(olds):
            if (old / "index" / META_FILE).is_file():
                os.replace(old / "index", directory)
                log.warning("restored the index %s that an interrupted save had moved to %s", directory, old)
                break
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in parent.glob(f".{directory.name}.*.tmp"):
        log.warning("removing %s, left by an interrupted index save", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve_params(kind: str, n: int, dim: int, params: dict[str, Any]) -> dict[str, Any]:
    p: dict[str, Any] = {}
    if kind in ("ivf", "ivfpq"):
        nlist = int(params.get("nlist") or max(1, min(int(4 * math.sqrt(n)), n // 39)))
        if not 1 <= nlist <= n:
            raise ValueError(f"nlist={nlist} must be between 1 and the number of gallery vectors {n}")
        cells = nlist if kind == "ivf" else max(nlist, 2 ** int(params.get("nbits") or 8))  # PQ codebooks too
        train_size = int(params.get("train_size") or min(n, 64 * cells))
        if not nlist <= train_size <= n:
            raise ValueError(f"train_size={train_size} must be between nlist={nlist} and {n}")
        p.update(nlist=nlist, nprobe=min(int(params.get("nprobe") or min(nlist, 32)), nlist), train_size=train_size)
    if kind == "ivfpq":
        nbits = int(params.get("nbits") or 8)
        pq_m = params.get("pq_m")
        if pq_m is None:
            pq_m = max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)
        if dim % int(pq_m):
            raise ValueError(f"pq_m={pq_m} must divide the dimension {dim}")
        if p["train_size"] < 2 ** nbits:
            raise ValueError(f"ivfpq with nbits={nbits} needs at least {2 ** nbits} training vectors, "
                             f"got {p['train_size']}")
        p.update(pq_m=int(pq_m), nbits=nbits)
    if kind == "hnsw":
        p.update(m=int(params.get("m") or 32), ef_construction=int(params.get("ef_construction") or 80),
                 ef_search=int(params.get("ef_search") or 64))
    return p


def _make_index(kind: str, dim: int, p: dict[str, Any]) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, p["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p["ef_construction"]
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, p["nlist"], faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, p["nlist"], p["pq_m"], p["nbits"], faiss.METRIC_INNER_PRODUCT)
    return index  # faiss's Python wrapper keeps ``quantizer`` referenced by the index


def _to_gpu(index: faiss.Index) -> faiss.Index:  # pragma: no cover - needs faiss-gpu and a CUDA device
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
    gpu_index.__dict__["_resources"] = resources
    return gpu_index
