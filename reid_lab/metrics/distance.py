"""Query x gallery distances, and ReID evaluation straight from features without the full distance matrix.

Conventions of the field (torchreid, fast-reid; ``shared/reference/reid-toolboxes.md`` §3): smaller = more similar;
``"cosine"`` distance is ``1 - cos(q, g)`` on L2-normalised features, ``"euclidean"`` is the SQUARED euclidean
distance ``||q||^2 + ||g||^2 - 2 q.g`` (clamped at 0), which ranks like the euclidean distance.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from reid_lab.metrics.rank import RankResult, check_chunk_size, clip_max_rank, ids_tensor, optional_camids
from reid_lab.metrics.ranking_engine import GalleryRanker, QueryStats, flatnonzero, ranking_threads

__all__ = [
    "TiledDistances",
    "check_memory_budget",
    "compute_distance",
    "default_memory_budget",
    "distance_slices",
    "evaluate_features",
    "reserved_bytes",
    "tile_columns",
]

DistanceMetric = Literal["cosine", "euclidean"]
BLOCK_ROWS = 256  # query rows of every distance product (see _padded_rows)
MIN_TILE_COLUMNS = 1024  # gallery columns of the narrowest tile (thin products run below the BLAS peak)
DEFAULT_MEMORY_BUDGET = {"cpu": 256 << 20, "cuda": 2 << 30}
MIN_MEMORY_BUDGET = 32 << 20
# The gallery's pid index (GalleryRanker): the stable argsort order, the sorted pids while it is built, int64 ids.
INDEX_BYTES_PER_ITEM = 32
_METRICS = ("cosine", "euclidean")


def _features(x: Any, name: str) -> torch.Tensor:
    """2-d float features as a tensor (half precision is upcast to float32, float64 kept)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.array(x, copy=True))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-d (num_items, feature_dim), got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise TypeError(f"{name} must hold real numbers, got {x.dtype}")
    x = x.detach()
    if x.dtype != torch.float64:
        x = x.float()
    return x


def _check_pair(query: torch.Tensor, gallery: torch.Tensor, metric: str, normalize: bool | None) -> bool:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query_features and gallery_features must have the same feature dim, got {tuple(query.shape)} "
            f"and {tuple(gallery.shape)}"
        )
    if query.device != gallery.device:
        raise ValueError(f"query_features is on {query.device} but gallery_features on {gallery.device}")
    return metric == "cosine" if normalize is None else bool(normalize)


def _prepare(
    query_features: Any, gallery_features: Any, metric: str, normalize: bool | None, stream_half: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(query, gallery, squared gallery norms or None) in a common float dtype, normalised if asked.

    ``stream_half``: a float16/bfloat16 gallery that needs no normalisation or norms (cosine of unit features)
    stays half (no float32 copy of a 10M-row gallery); the caller upcasts it tile by tile (exact).
    """
    query = _features(query_features, "query_features")
    if (stream_half and isinstance(gallery_features, torch.Tensor) and gallery_features.dim() == 2
            and gallery_features.dtype in (torch.float16, torch.bfloat16) and metric == "cosine"
            and normalize is False and query.dtype == torch.float32):
        gallery = gallery_features.detach()
        _check_pair(query, gallery, metric, normalize)
        return query, gallery, None
    gallery = _features(gallery_features, "gallery_features")
    do_normalize = _check_pair(query, gallery, metric, normalize)
    dtype = torch.promote_types(query.dtype, gallery.dtype)
    query, gallery = query.to(dtype), gallery.to(dtype)
    if do_normalize:
        query, gallery = F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    # vector_norm reduces without a (num_gallery, dim) temporary, unlike gallery.pow(2).sum(1)
    g_sq = torch.linalg.vector_norm(gallery, dim=1).square() if metric == "euclidean" else None
    return query, gallery, g_sq


def _block(query: torch.Tensor, gallery: torch.Tensor, g_sq: torch.Tensor | None, out: torch.Tensor,
           q_sq: torch.Tensor | None = None) -> None:
    """Distances of a block of query rows into ``out`` ``(block, num_gallery)``; ``q_sq``: the rows' squared norms
    (euclidean; computed here when not given)."""
    torch.matmul(query, gallery.T, out=out)
    if g_sq is None:  # cosine: 1 - q.g
        out.neg_().add_(1.0)
    else:  # squared euclidean: |q|^2 + |g|^2 - 2 q.g, clamped: rounding can make it slightly negative
        if q_sq is None:
            q_sq = query.pow(2).sum(1, keepdim=True)
        out.mul_(-2.0).add_(g_sq[None, :]).add_(q_sq).clamp_(min=0.0)


def _padded_rows(query: torch.Tensor, start: int, buffer: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Query rows ``start : start + BLOCK_ROWS`` as a ``(BLOCK_ROWS, dim)`` matrix, zero rows past the end.

    Every product runs with exactly ``BLOCK_ROWS`` query rows: MKL's kernels for thin left operands (a few rows)
    round differently from the wide ones and depend on the thread count, so a fixed row count is what makes the
    distances, hence the ranking, bit-identical whatever the memory budget and threads.
    """
    stop = min(start + BLOCK_ROWS, query.shape[0])
    if stop - start == BLOCK_ROWS:
        return query[start:stop], BLOCK_ROWS
    buffer.zero_()
    buffer[: stop - start] = query[start:stop]
    return buffer, stop - start


def _distance_slices(
    query: torch.Tensor, gallery: torch.Tensor, g_sq: torch.Tensor | None, chunk: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, distances of query rows start:start + len)`` in slices of at most ``chunk`` rows.

    The distances are computed in blocks of exactly ``BLOCK_ROWS`` query rows (see :func:`_padded_rows`; thin
    matrix multiplies also run far below the BLAS peak: 25-row blocks at MSMT17 scale were 1.7x slower) into one
    reused buffer, so a slice is only valid until the next one is drawn.
    """
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    buffer = torch.empty((BLOCK_ROWS, num_gallery), dtype=query.dtype, device=query.device)
    pad = torch.empty((BLOCK_ROWS, query.shape[1]), dtype=query.dtype, device=query.device)
    for start in range(0, num_query, BLOCK_ROWS):
        rows_q, rows = _padded_rows(query, start, pad)
        _block(rows_q, gallery, g_sq, buffer)
        for s in range(0, rows, chunk):
            yield start + s, buffer[s : min(s + chunk, rows)]


def distance_slices(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    metric: DistanceMetric = "cosine",
    normalize: bool | None = None,
    chunk_size: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Query x gallery distances as consecutive slices of query rows, never the whole matrix.

    The same distances as :func:`compute_distance` (same arguments), computed in BLAS-friendly blocks of exactly
    256 query rows and handed out in slices of ``chunk_size`` rows; memory is one ``(256, num_gallery)`` block
    (for a ranking within a memory budget whatever the gallery, see :class:`TiledDistances`).

    Args:
        query_features: ``(num_query, dim)`` features.
        gallery_features: ``(num_gallery, dim)`` features, same device.
        metric: ``"cosine"`` or ``"euclidean"`` (squared), as :func:`compute_distance`.
        normalize: as :func:`compute_distance`.
        chunk_size: query rows per slice; ``None`` picks ~2M (CPU) / ~16M (GPU) distances per slice.

    Yields:
        ``(start, block)``: ``block`` is ``(rows, num_gallery)``, the distances of queries ``start:start + rows``.
        It is a view of a reused buffer: copy it to keep it past the next iteration.

    Example:
        >>> q, g = torch.eye(3), torch.eye(3)
        >>> [(start, block.shape) for start, block in distance_slices(q, g, chunk_size=2)]
        [(0, torch.Size([2, 3])), (2, torch.Size([1, 3]))]
    """
    query, gallery, g_sq = _prepare(query_features, gallery_features, metric, normalize)
    chunk = check_chunk_size(chunk_size, gallery.shape[0], query.device)
    return _distance_slices(query, gallery, g_sq, chunk)


def compute_distance(
    query_features: torch.Tensor | np.ndarray,
    gallery_features: torch.Tensor | np.ndarray,
    metric: DistanceMetric = "cosine",
    normalize: bool | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Query x gallery distance matrix, computed in blocks of query rows on the features' device.

    Args:
        query_features: ``(num_query, dim)`` features. float16/bfloat16 are computed in float32; float64 stays.
        gallery_features: ``(num_gallery, dim)`` features, same device.
        metric: ``"cosine"`` (``1 - cos``) or ``"euclidean"`` (SQUARED euclidean, as torchreid / fast-reid).
        normalize: L2-normalise the features first. ``None``: True for cosine, False for euclidean. Cosine with
            ``normalize=False`` computes ``1 - q.g`` and so assumes the features are already unit-norm.
        chunk_size: query rows per block (bounds the ``(chunk_size, dim)`` temporaries).

    Returns:
        ``(num_query, num_gallery)`` float32 tensor (float64 if a feature input is float64).

    Example:
        >>> q = torch.tensor([[1.0, 0.0]]); g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
        >>> compute_distance(q, g).tolist()
        [[0.0, 1.0, 2.0]]
        >>> compute_distance(q, g, metric="euclidean").tolist()
        [[0.0, 5.0, 16.0]]
    """
    query, gallery, g_sq = _prepare(query_features, gallery_features, metric, normalize)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    out = torch.empty((query.shape[0], gallery.shape[0]), dtype=query.dtype, device=query.device)
    for start in range(0, query.shape[0], chunk_size):
        stop = min(start + chunk_size, query.shape[0])
        _block(query[start:stop], gallery, g_sq, out[start:stop])
    return out


def default_memory_budget(device: torch.device, reserved: int = 0) -> int:
    """Bytes of working memory a gallery ranking may take when the caller sets none: 256 MiB on CPU (2 GiB on a
    GPU) for the distance tiles and ranking state (tiles of ~50k gallery columns at 256 query rows: a
    cache-friendly size whatever the gallery), plus ``reserved`` (:func:`reserved_bytes`)."""
    return DEFAULT_MEMORY_BUDGET["cpu" if device.type == "cpu" else "cuda"] + reserved


def reserved_bytes(num_gallery: int, copies: tuple[tuple[torch.Tensor, Any], ...] = ()) -> int:
    """What a ranking holds besides its tiles: the gallery's pid index (``INDEX_BYTES_PER_ITEM`` per item) and
    every prepared feature matrix that is a copy of its input (normalised, upcast, or from numpy), given as
    ``(prepared, input)`` pairs."""
    total = INDEX_BYTES_PER_ITEM * num_gallery
    for prepared, given in copies:
        if not (isinstance(given, torch.Tensor) and prepared.data_ptr() == given.data_ptr()):
            total += prepared.numel() * prepared.element_size()
    return total


def check_memory_budget(memory_budget: int | None, device: torch.device, reserved: int = 0) -> int:
    """Validate ``memory_budget`` (bytes); ``None``: :func:`default_memory_budget`.

    Raises:
        ValueError: below ``MIN_MEMORY_BUDGET`` plus ``reserved`` (:func:`reserved_bytes`).
    """
    if memory_budget is None:
        return default_memory_budget(device, reserved)
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, np.integer)):
        raise ValueError(f"memory_budget must be an integer number of bytes or None, got {memory_budget!r}")
    minimum = MIN_MEMORY_BUDGET + reserved
    if memory_budget < minimum:
        raise ValueError(f"memory_budget must be at least {minimum} bytes ({minimum / 2**20:.0f} MiB: one "
                         f"{BLOCK_ROWS} x {MIN_TILE_COLUMNS} distance tile and its ranking state, plus "
                         f"{reserved / 2**20:.1f} MiB for the gallery's pid index and the normalised or upcast "
                         f"copies of the features; pass unit-norm float32 tensors with normalize=False to avoid "
                         f"the copies), got {memory_budget}")
    return int(memory_budget)


def budget_cells(memory_budget: int, num_gallery: int, reserved: int = 0) -> int:
    """Quantisation cells per row for a ranking within ``memory_budget``: the engine's default
    ``clamp(num_gallery // 8, 64, 4096)``, fewer when the per-row cell tables would take over a quarter of the
    tile budget (results never depend on the cell count)."""
    auto = min(max(num_gallery // 8, 64), 4096)
    return max(64, min(auto, (memory_budget - reserved) // (4 * 5 * 8 * BLOCK_ROWS)))


def tile_columns(
    memory_budget: int,
    num_gallery: int,
    itemsize: int,
    num_cells: int,
    dim: int = 0,
    sides: int = 1,
    reserved: int = 0,
    element_bytes: int | None = None,
) -> int:
    """Gallery columns per distance tile so that a ranking stays within ``memory_budget`` bytes.

    What the budget pays for: ``reserved`` (:func:`reserved_bytes`), ~5 int64 tables of
    ``BLOCK_ROWS x (num_cells + 2)`` cells per block, 1/8 kept for the pair products and small temporaries, and
    per tile column and query row: the distance and the float cell key (``itemsize`` each), the int32 cell key
    and bool masks (:class:`~reid_lab.metrics.ranking_engine.BlockRanking`), times ``sides`` galleries ranked
    together (2 for backfill curves); ``dim`` floats per column when a half gallery is upcast tile by tile.
    ``element_bytes`` replaces the per-element cost of one side (``3 * itemsize + 6``) for rankers that keep more.
    """
    available = (memory_budget - reserved) * 7 // 8 - 5 * 8 * BLOCK_ROWS * (num_cells + 2)
    per_element = 3 * itemsize + 6 if element_bytes is None else element_bytes
    per_column = sides * (BLOCK_ROWS * per_element + 4 * dim)
    columns = max(MIN_TILE_COLUMNS, available // per_column)
    return num_gallery if columns >= num_gallery else int(columns)


def _tiles(num_gallery: int, columns: int) -> list[tuple[int, int]]:
    """``[(c0, c1)]`` covering the gallery in near-equal tiles of at most ``columns`` columns (none thin: thin
    right operands take another BLAS kernel, see :func:`_padded_rows`)."""
    count = -(-num_gallery // columns)
    bounds = [round(i * num_gallery / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class TiledDistances:
    """Query x gallery distances for a ranking within a memory budget: blocks of ``BLOCK_ROWS`` query rows, each
    in tiles of gallery columns, and the few pairs a block ranks exactly (its positives and junk) up front.

    Every product has ``BLOCK_ROWS`` query rows (:func:`_padded_rows`) and at least ``MIN_TILE_COLUMNS`` gallery
    columns, so a pair's distance has the same bits in a tile, in the pair product and whatever ``columns`` and the
    thread count are (float32 on CPU, where MKL's kernel is column-count invariant; elsewhere the pairs are read
    from a first pass over the tiles instead: twice the products, the same bits).

    Args:
        query: ``(num_query, dim)`` float features (as :func:`_prepare` returns them).
        gallery: ``(num_gallery, dim)`` features, same device; float16/bfloat16 is upcast tile by tile.
        g_sq: squared gallery norms (euclidean) or ``None`` (cosine).
        columns: most gallery columns per tile (:func:`tile_columns`).
    """

    def __init__(self, query: torch.Tensor, gallery: torch.Tensor, g_sq: torch.Tensor | None, columns: int) -> None:
        self.query, self.gallery, self.g_sq = query, gallery, g_sq
        self.dtype, self.device = query.dtype, query.device
        self.tiles = _tiles(gallery.shape[0], columns)
        self.gather = self.dtype == torch.float32 and self.device.type == "cpu"
        width = max(c1 - c0 for c0, c1 in self.tiles)
        self._buffer = torch.empty(BLOCK_ROWS * width, dtype=self.dtype, device=self.device)
        self._pad = torch.empty((BLOCK_ROWS, query.shape[1]), dtype=self.dtype, device=self.device)
        self._rows_q = self._q_sq = None
        self.rows = 0

    def blocks(self) -> Iterator[tuple[int, int]]:
        """``(start, rows)`` of each query block; the block's tiles and pairs are read until the next one."""
        for start in range(0, self.query.shape[0], BLOCK_ROWS):
            self._rows_q, self.rows = _padded_rows(self.query, start, self._pad)
            self._q_sq = None if self.g_sq is None else self._rows_q.pow(2).sum(1, keepdim=True)
            yield start, self.rows

    def _product(self, c0: int, c1: int, index: torch.Tensor | None = None) -> torch.Tensor:
        cols = c1 - c0
        if index is None:
            rows_g, g_sq = self.gallery[c0:c1], None if self.g_sq is None else self.g_sq[c0:c1]
            out = self._buffer[: BLOCK_ROWS * cols].view(BLOCK_ROWS, cols)
        else:
            rows_g, g_sq = self.gallery.index_select(0, index), None if self.g_sq is None else self.g_sq[index]
            out = torch.empty((BLOCK_ROWS, cols), dtype=self.dtype, device=self.device)
        _block(self._rows_q, rows_g.to(self.dtype), g_sq, out, self._q_sq)
        return out

    def block_tiles(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(col0, (rows, cols) distances)`` of the current block's tiles (a reused buffer: valid until the next)."""
        for c0, c1 in self.tiles:
            yield c0, self._product(c0, c1)[: self.rows]

    def pairs(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Distances of pairs ``(row of the current block, gallery index)``, bit-identical to the tiles'."""
        if not self.gather:
            out = torch.empty(rows.shape, dtype=self.dtype, device=self.device)
            for c0, tile in self.block_tiles():
                inside = flatnonzero((cols >= c0) & (cols < c0 + tile.shape[1]))
                out[inside] = tile[rows[inside], cols[inside] - c0]
            return out
        uniq, inverse = torch.unique(cols, return_inverse=True)
        width = max(int(uniq.numel()), MIN_TILE_COLUMNS)
        take = torch.zeros(width, dtype=torch.int64, device=self.device)
        take[: uniq.numel()] = uniq
        return self._product(0, width, take)[rows, inverse]


def _rank_gallery(
    query: torch.Tensor,
    gallery: torch.Tensor,
    g_sq: torch.Tensor | None,
    ranker: GalleryRanker,
    q_pids: torch.Tensor,
    q_camids: torch.Tensor | None,
    memory_budget: int,
    reserved: int,
) -> QueryStats:
    """Per-query stats of all queries against the gallery, in distance tiles sized by ``memory_budget``;
    identical stats whatever the budget (see :class:`TiledDistances`)."""
    upcast = query.shape[1] if gallery.dtype != query.dtype else 0
    columns = tile_columns(memory_budget, gallery.shape[0], query.dtype.itemsize, ranker.num_cells, upcast,
                           reserved=reserved)
    tiled = TiledDistances(query, gallery, g_sq, columns)
    parts = []
    for start, rows in tiled.blocks():
        qp = q_pids[start : start + rows]
        qc = None if q_camids is None else q_camids[start : start + rows]
        if len(tiled.tiles) == 1:  # the whole row at once: the positives are read off it
            (_, dist), = tiled.block_tiles()
            parts.append(ranker(dist, qp, qc))
            continue
        pairs = ranker.positive_and_junk_pairs(qp, qc)
        pair_d = tiled.pairs(torch.cat([pairs[0], pairs[2]]), torch.cat([pairs[1], pairs[3]]))
        num_pos = pairs[0].numel()
        block = ranker.start(rows, pairs, pair_d[:num_pos], pair_d[num_pos:])
        for c0, tile in tiled.block_tiles():
            block.add_tile(tile, c0)
        parts.append(block.finish())
    return QueryStats.concat(parts)


def evaluate_features(
    query_features: torch.Tensor | np.ndarray,
    gallery_features: torch.Tensor | np.ndarray,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any = None,
    g_camids: Any = None,
    metric: DistanceMetric = "cosine",
    max_rank: int = 50,
    chunk_size: int | None = None,
    normalize: bool | None = None,
    memory_budget: int | None = None,
) -> RankResult:
    """CMC / mAP / mINP from features, never holding the full distance matrix.

    Same protocol and tie rule as ``evaluate_rank(compute_distance(...), ...)``: blocks of 256 query rows are
    turned into distances one gallery tile at a time and ranked by the sort-free core as the tiles arrive
    (:class:`~reid_lab.metrics.ranking_engine.BlockRanking`), so the working memory stays within
    ``memory_budget`` whatever the gallery size (10M x 256 included), time grows linearly with the gallery, and
    everything runs on the features' device. The result is bit-identical whatever the budget and the thread count
    (float32 on CPU: every product has the same 256-row shape). Without camera ids (both ``None``)
    the cross-modal protocol applies: nothing is dropped, so a query inside the gallery finds itself (see
    :func:`~reid_lab.metrics.rank.evaluate_rank`).

    Args:
        query_features: ``(num_query, dim)`` features.
        gallery_features: ``(num_gallery, dim)`` features, same device.
        q_pids: ``(num_query,)`` integer query pids.
        g_pids: ``(num_gallery,)`` integer gallery pids.
        q_camids: ``(num_query,)`` integer query camera ids, or ``None`` (cross-modal protocol).
        g_camids: ``(num_gallery,)`` integer gallery camera ids, or ``None``; ``None`` exactly when ``q_camids`` is.
        metric: ``"cosine"`` or ``"euclidean"`` (squared), see :func:`compute_distance`.
        max_rank: length of the CMC curve, clipped to ``num_gallery``.
        chunk_size: superseded by ``memory_budget``; when given without a budget, the budget is that of
            ``chunk_size`` full rows of distances (what it bounded before), at least the minimum.
        normalize: as in :func:`compute_distance`.
        memory_budget: bytes of working memory beyond the inputs (distance tiles and ranking state); ``None``:
            :func:`default_memory_budget`: 256 MiB on CPU, 2 GiB on GPU, plus the gallery's pid index (32 bytes
            per item) and any normalised / upcast copy of the features (none for unit-norm float32 tensors with
            ``normalize=False``); at least 32 MiB plus those.

    Returns:
        :class:`~reid_lab.metrics.rank.RankResult`.

    Example:
        >>> q = torch.tensor([[1.0, 0.0]]); g = torch.tensor([[0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
        >>> r = evaluate_features(q, g, [7], [7, 3, 7], [0], [1, 1, 2])
        >>> r.cmc[:2].tolist(), r.mAP
        ([1.0, 1.0], 1.0)
    """
    query, gallery, g_sq = _prepare(query_features, gallery_features, metric, normalize, stream_half=True)
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    if num_query == 0 or num_gallery == 0:
        raise ValueError(f"no valid query: {num_query} query and {num_gallery} gallery features")
    max_rank = clip_max_rank(max_rank, num_gallery)
    device = query.device
    reserved = reserved_bytes(num_gallery, ((query, query_features), (gallery, gallery_features)))
    if memory_budget is None and chunk_size is not None:
        chunk = check_chunk_size(chunk_size, num_gallery, device)
        memory_budget = max(MIN_MEMORY_BUDGET, chunk * num_gallery * (3 * query.dtype.itemsize + 6)) + reserved
    budget = check_memory_budget(memory_budget, device, reserved)
    qp = ids_tensor(q_pids, "q_pids", num_query, device)
    qc, gc = optional_camids(q_camids, g_camids, num_query, num_gallery, device)
    cells = budget_cells(budget, num_gallery, reserved)
    ranker = GalleryRanker(ids_tensor(g_pids, "g_pids", num_gallery, device), gc, num_cells=cells)
    with ranking_threads():  # the cores left free by other jobs (results do not depend on threads)
        stats = _rank_gallery(query, gallery, g_sq, ranker, qp, qc, budget, reserved)
    return RankResult.from_query_stats(stats, max_rank)
