"""Query x gallery distances, and ReID evaluation straight from features without the full distance matrix.

Conventions of the field (torchreid, fast-reid; ``shared/reference/reid-toolboxes.md`` §3): smaller = more similar;
``"cosine"`` distance is ``1 - cos(q, g)`` on L2-normalised features, ``"euclidean"`` is the SQUARED euclidean
distance ``||q||^2 + ||g||^2 - 2 q.g`` (clamped at 0), which ranks like the euclidean distance.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from reid_lab.metrics import ranking_engine
from reid_lab.metrics.rank import RankResult, check_chunk_size, clip_max_rank, ids_tensor, optional_camids
from reid_lab.metrics.ranking_engine import SPREAD, GalleryRanker, QueryStats, flatnonzero, ranking_threads

__all__ = [
    "RankingPlan",
    "TiledDistances",
    "check_memory_budget",
    "compute_distance",
    "default_memory_budget",
    "distance_slices",
    "evaluate_features",
    "reserved_bytes",
    "rank_rows",
    "ranking_plan",
    "row_blocks",
    "tile_columns",
]

DistanceMetric = Literal["cosine", "euclidean"]
PRODUCT_ROWS = 2048  # most query rows of one distance product (wide products run near the BLAS peak)
MIN_PRODUCT_ROWS = 16  # fewest query rows of a product: thinner ones round differently (see _product_rows)
RANK_ROWS = 128  # most query rows ranked together (their ranking scratch stays in the CPU's cache)
RANK_ELEMENTS = 1 << 22  # distances ranked together (rank_rows)
MIN_FULL_ROWS = 256  # fewest query rows per product before the gallery is cut into column tiles (ranking_plan)
SLICE_ROWS = 256  # query rows per product of distance_slices (its memory: one (256, num_gallery) block)
MIN_TILE_COLUMNS = 1024  # gallery columns of the narrowest tile (thin products run below the BLAS peak)
CPU_TILE_COLUMNS = 20_000  # widest column tile on CPU (wider ones leave the cache: 1.5x slower, see ranking_plan)
DEFAULT_MEMORY_BUDGET = {"cpu": 256 << 20, "cuda": 2 << 30}
MIN_MEMORY_BUDGET = 32 << 20
# The gallery's pid index (GalleryRanker): the stable argsort order, the sorted pids while it is built, int64 ids.
INDEX_BYTES_PER_ITEM = 32
KERNEL_COLUMN_BYTES = 5  # the compiled ranking kernel's scratch per gallery column and thread (rank_kernel)
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
    if g_sq is not None and q_sq is None:
        q_sq = query.pow(2).sum(1, keepdim=True)
    _to_distance(out, g_sq, q_sq)


def _to_distance(out: torch.Tensor, g_sq: torch.Tensor | None, q_sq: torch.Tensor | None) -> None:
    """Turn the products ``q.g`` in ``out`` into distances in place: ``1 - q.g`` (cosine, ``g_sq`` None) or the
    squared euclidean ``|q|^2 + |g|^2 - 2 q.g`` clamped at 0 (rounding can make it slightly negative); elementwise,
    so any row slice of a product gets the same bits."""
    if g_sq is None:  # one pass
        torch.sub(out.new_ones(()), out, out=out)
    else:  # |g|^2 + (-2) q.g rounds once whether or not the add is fused: -2 q.g is exact
        torch.add(g_sq[None, :], out, alpha=-2.0, out=out).add_(q_sq).clamp_(min=0.0)


def row_blocks(num_rows: int, max_rows: int) -> list[tuple[int, int]]:
    """``[(start, stop)]``: ``num_rows`` query rows in the fewest blocks of at most ``max_rows`` rows, of near-equal
    size (no thin remainder block).

    Example:
        >>> row_blocks(3368, 1024)
        [(0, 842), (842, 1684), (1684, 2526), (2526, 3368)]
    """
    count = -(-num_rows // max(max_rows, 1))
    size = -(-num_rows // max(count, 1))
    return [(start, min(start + size, num_rows)) for start in range(0, num_rows, size)]


def _product_height(blocks: list[tuple[int, int]]) -> int:
    """Rows of the tallest product of ``blocks`` (:func:`row_blocks`), thin blocks padded (:func:`_product_rows`)."""
    return max(max(stop - start for start, stop in blocks), MIN_PRODUCT_ROWS)


def _product_rows(query: torch.Tensor, start: int, stop: int, pad: torch.Tensor) -> torch.Tensor:
    """Query rows ``start:stop`` as the left operand of a product: a view, or, below ``MIN_PRODUCT_ROWS`` rows, the
    rows in the ``(MIN_PRODUCT_ROWS, dim)`` buffer ``pad`` followed by zero rows.

    MKL's float32 CPU kernels give a distance the same bits in any product of 16 or more query rows (and any
    gallery columns) at 1 or 2 threads; thinner products take other kernels that round differently (1-3 rows at
    1 thread, 5-7 and 9-11 rows at 2 threads on the project's box; ``benchmarks/product_shape.py`` checks it).
    Padding those keeps every path's distances (ranking tiles, pair products, :func:`compute_distance`)
    bit-identical, hence the rankings identical whatever the memory budget, the blocks and the threads.
    """
    if stop - start >= MIN_PRODUCT_ROWS:
        return query[start:stop]
    pad.zero_()
    pad[: stop - start] = query[start:stop]
    return pad


def _distance_slices(
    query: torch.Tensor, gallery: torch.Tensor, g_sq: torch.Tensor | None, chunk: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, distances of query rows start:start + len)`` in slices of at most ``chunk`` rows.

    The distances are computed in products of at most ``SLICE_ROWS`` query rows (see :func:`_product_rows`; thin
    matrix multiplies also run far below the BLAS peak: 25-row blocks at MSMT17 scale were 1.7x slower) into one
    reused buffer, so a slice is only valid until the next one is drawn.
    """
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    blocks = row_blocks(num_query, SLICE_ROWS)
    height = _product_height(blocks)
    buffer = torch.empty((height, num_gallery), dtype=query.dtype, device=query.device)
    pad = torch.empty((MIN_PRODUCT_ROWS, query.shape[1]), dtype=query.dtype, device=query.device)
    for start, stop in blocks:
        rows_q = _product_rows(query, start, stop, pad)
        out = buffer[: rows_q.shape[0]]
        _block(rows_q, gallery, g_sq, out)
        for s in range(0, stop - start, chunk):
            yield start + s, out[s : min(s + chunk, stop - start)]


def distance_slices(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    metric: DistanceMetric = "cosine",
    normalize: bool | None = None,
    chunk_size: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Query x gallery distances as consecutive slices of query rows, never the whole matrix.

    The same distances as :func:`compute_distance` (same arguments), computed in BLAS-friendly blocks of at most
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
        chunk_size: most query rows per product (blocks are near-equal; fewer than 16 rows are computed in a
            padded 16-row product, see :func:`_product_rows`).

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
    pad = torch.empty((MIN_PRODUCT_ROWS, query.shape[1]), dtype=query.dtype, device=query.device)
    for start, stop in row_blocks(query.shape[0], int(chunk_size)):
        rows_q = _product_rows(query, start, stop, pad)
        if rows_q is pad:  # a thin block: its rows of a padded product (same bits as in any wider product)
            padded = torch.empty((MIN_PRODUCT_ROWS, gallery.shape[0]), dtype=query.dtype, device=query.device)
            _block(rows_q, gallery, g_sq, padded)
            out[start:stop] = padded[: stop - start]
        else:
            _block(rows_q, gallery, g_sq, out[start:stop])
    return out


def default_memory_budget(device: torch.device, reserved: int = 0) -> int:
    """Bytes of working memory a gallery ranking may take when the caller sets none: 256 MiB on CPU (2 GiB on a
    GPU) for the distance tiles and ranking state (whole gallery rows up to ~100k items, in products of 2,048
    query rows at Market size and of fewer rows as the gallery grows; tiles of ~40k columns beyond, see
    :func:`ranking_plan`), plus ``reserved`` (:func:`reserved_bytes`)."""
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
                         f"{PRODUCT_ROWS} x {MIN_TILE_COLUMNS} distance tile and its ranking state, plus "
                         f"{reserved / 2**20:.1f} MiB for the gallery's pid index and the normalised or upcast "
                         f"copies of the features; pass unit-norm float32 tensors with normalize=False to avoid "
                         f"the copies), got {memory_budget}")
    return int(memory_budget)


def budget_cells(memory_budget: int, num_gallery: int, reserved: int = 0, rows: int = PRODUCT_ROWS) -> int:
    """Quantisation cells per row for a ranking of blocks of ``rows`` query rows within ``memory_budget``: the
    engine's default (:class:`~reid_lab.metrics.ranking_engine.GalleryRanker`), fewer when the per-row cell tables
    would take over a quarter of the tile budget (results never depend on the cell count)."""
    auto = GalleryRanker.default_cells(num_gallery)
    return max(64, min(auto, (memory_budget - reserved) // (4 * 5 * 8 * rows) - 2 * SPREAD))


def tile_columns(
    memory_budget: int,
    num_gallery: int,
    itemsize: int,
    num_cells: int,
    dim: int = 0,
    sides: int = 1,
    reserved: int = 0,
    element_bytes: int | None = None,
    product_rows: int = PRODUCT_ROWS,
    rank_rows: int = RANK_ROWS,
) -> int:
    """Gallery columns per distance tile so that a ranking stays within ``memory_budget`` bytes.

    What the budget pays for: ``reserved`` (:func:`reserved_bytes`), ~5 int64 tables of
    ``num_cells + 2 * SPREAD`` cells per query row of a product block (every ranking block of a product block is
    alive while its tiles arrive), 1/8 kept for the pair products and small temporaries, and per tile column: the
    ``product_rows`` distances (``itemsize`` each) and, per ``rank_rows`` ranked together, the float and int32 cell
    keys and a bool mask (:class:`~reid_lab.metrics.ranking_engine.BlockRanking`), times ``sides`` galleries ranked
    together (2 for backfill curves); ``dim`` floats per column when a half gallery is upcast tile by tile.
    ``element_bytes`` replaces the per-element ranking cost (``2 * itemsize + 6``) for rankers that keep more.
    ``num_cells=0``: the compiled kernel counts the tiles (no cell tables, no per-element scratch, only
    ``KERNEL_COLUMN_BYTES`` per column and thread).
    """
    kernel = num_cells == 0
    tables = 0 if kernel else 5 * 8 * product_rows * (num_cells + 2 * SPREAD)
    available = (memory_budget - reserved) * 7 // 8 - tables
    per_element = 0 if kernel else 2 * itemsize + 6 if element_bytes is None else element_bytes
    scratch = KERNEL_COLUMN_BYTES * torch.get_num_threads() if kernel else 0
    per_column = sides * (product_rows * itemsize + rank_rows * per_element + 4 * dim + scratch)
    columns = max(MIN_TILE_COLUMNS, available // per_column)
    return num_gallery if columns >= num_gallery else int(columns)


@dataclass(frozen=True)
class RankingPlan:
    """How :func:`evaluate_features` ranks within a memory budget (:func:`ranking_plan`); results never depend on it.

    Attributes:
        cells: quantisation cells per row of the ranking engine's torch path (0: the compiled CPU kernel).
        columns: gallery columns per distance tile (``>= num_gallery``: whole rows, one tile).
        product_rows: most query rows per distance product.
        rank_rows: most query rows ranked together (their scratch stays in the CPU's cache).
    """

    cells: int
    columns: int
    product_rows: int
    rank_rows: int


def rank_rows(num_gallery: int) -> int:
    """Query rows ranked together: about ``RANK_ELEMENTS`` distances, between 16 and ``RANK_ROWS`` rows."""
    return max(MIN_PRODUCT_ROWS, min(RANK_ROWS, RANK_ELEMENTS // max(num_gallery, 1)))


def ranking_plan(memory_budget: int, num_query: int, num_gallery: int, itemsize: int, reserved: int = 0,
                 upcast_dim: int = 0, kernel: bool = False, max_columns: int | None = None) -> RankingPlan:
    """The :class:`RankingPlan` of :func:`evaluate_features` for ``num_query`` queries against ``num_gallery``
    items within ``memory_budget`` (``upcast_dim``: the feature dim when a half gallery is upcast tile by tile).

    Whole gallery rows are preferred: products of up to ``PRODUCT_ROWS`` query rows when their full rows fit the
    budget, else of as many rows as fit (at least ``MIN_FULL_ROWS``), else products of up to ``PRODUCT_ROWS`` rows
    in tiles of gallery columns. Products in column tiles are slower on this CPU (MKL's speed varies by up to 40 %
    with the tile's width) and each ranking block then needs a pair product for its positives. ``kernel``: the
    tiles are counted by the compiled CPU kernel, whose ranking state is a few bytes per row and column (more rows
    per product fit the budget: 512 instead of 256 at 100k x 256-d under the default budget). ``max_columns``:
    the widest column tile when the gallery is tiled (``CPU_TILE_COLUMNS`` on CPU: at 512 queries x 1M x 256-d,
    float16 gallery, 20k-25k-column tiles ran in 4.8-5.5 s against 8.3 s for the 75k-column tiles the budget
    allows, whose upcast gallery tile and products no longer fit the cache).
    """
    def plan(rows: int) -> RankingPlan:
        block = _product_height(row_blocks(num_query, rows))
        cells = 0 if kernel else budget_cells(memory_budget, num_gallery, reserved, block)
        ranked, columns = rank_rows(num_gallery), num_gallery
        for _ in range(2):  # rows ranked together hold about RANK_ELEMENTS distances of one tile
            ranked = min(rank_rows(min(columns, num_gallery)), block)
            columns = tile_columns(memory_budget, num_gallery, itemsize, cells, upcast_dim, reserved=reserved,
                                   product_rows=block, rank_rows=ranked)
            if max_columns is not None and columns < num_gallery:
                columns = max(MIN_TILE_COLUMNS, min(columns, max_columns))
        return RankingPlan(cells, columns, rows, ranked)

    first = plan(PRODUCT_ROWS)
    rows = PRODUCT_ROWS
    candidate = first
    while candidate.columns < num_gallery and rows > MIN_FULL_ROWS:  # fewer rows until whole rows fit
        rows = max(MIN_FULL_ROWS, rows // 2)
        candidate = plan(rows)
    return candidate if candidate.columns >= num_gallery else first


def _tiles(num_gallery: int, columns: int) -> list[tuple[int, int]]:
    """``[(c0, c1)]`` covering the gallery in near-equal tiles of at most ``columns`` columns (none thin: thin
    right operands take another BLAS kernel, see :func:`_product_rows`)."""
    count = -(-num_gallery // columns)
    bounds = [round(i * num_gallery / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class TiledDistances:
    """Query x gallery distances for a ranking within a memory budget: blocks of at most ``max_rows`` query rows
    (:func:`row_blocks`), each in tiles of gallery columns, and the few pairs a block ranks exactly (its positives
    and junk) up front.

    Every product has at least ``MIN_PRODUCT_ROWS`` query rows (:func:`_product_rows`) and at least
    ``MIN_TILE_COLUMNS`` gallery columns, so a pair's distance has the same bits in a tile, in the pair product and
    whatever ``columns``, ``max_rows`` and the thread count are (float32 on CPU, where MKL's kernel is row- and
    column-count invariant; elsewhere the pairs are read from a first pass over the tiles instead: twice the
    products, the same bits).

    Args:
        query: ``(num_query, dim)`` float features (as :func:`_prepare` returns them).
        gallery: ``(num_gallery, dim)`` features, same device; float16/bfloat16 is upcast tile by tile.
        g_sq: squared gallery norms (euclidean) or ``None`` (cosine).
        columns: most gallery columns per tile (:func:`tile_columns`).
        max_rows: most query rows per block (``PRODUCT_ROWS``: wide products run near the BLAS peak).
    """

    def __init__(self, query: torch.Tensor, gallery: torch.Tensor, g_sq: torch.Tensor | None, columns: int,
                 max_rows: int = PRODUCT_ROWS) -> None:
        self.query, self.gallery, self.g_sq = query, gallery, g_sq
        self.dtype, self.device = query.dtype, query.device
        self.tiles = _tiles(gallery.shape[0], columns)
        self.row_blocks = row_blocks(query.shape[0], max_rows)
        self.gather = self.dtype == torch.float32 and self.device.type == "cpu"
        width = max(c1 - c0 for c0, c1 in self.tiles)
        height = _product_height(self.row_blocks)
        self._buffer = torch.empty(height * width, dtype=self.dtype, device=self.device)
        self._pad = torch.empty((MIN_PRODUCT_ROWS, query.shape[1]), dtype=self.dtype, device=self.device)
        self._rows_q = self._q_sq = None
        self.rows = 0

    def blocks(self) -> Iterator[tuple[int, int]]:
        """``(start, rows)`` of each query block; the block's tiles and pairs are read until the next one."""
        for start, stop in self.row_blocks:
            self._rows_q, self.rows = _product_rows(self.query, start, stop, self._pad), stop - start
            self._q_sq = None if self.g_sq is None else self._rows_q.pow(2).sum(1, keepdim=True)
            yield start, self.rows

    def _product(self, c0: int, c1: int, index: torch.Tensor | None = None,
                 span: tuple[int, int] | None = None) -> torch.Tensor:
        if index is None:  # a tile of the whole block, in the reused buffer
            out = self._raw_product(c0, c1)
            _to_distance(out, None if self.g_sq is None else self.g_sq[c0:c1], self._q_sq)
            return out
        rows_q, q_sq = self._rows_q, self._q_sq
        if span is not None:  # a slice of the block's rows (at least MIN_PRODUCT_ROWS of them)
            rows_q, q_sq = rows_q[span[0] : span[1]], None if q_sq is None else q_sq[span[0] : span[1]]
        rows_g, g_sq = self.gallery.index_select(0, index), None if self.g_sq is None else self.g_sq[index]
        out = torch.empty((rows_q.shape[0], c1 - c0), dtype=self.dtype, device=self.device)
        _block(rows_q, rows_g.to(self.dtype), g_sq, out, q_sq)
        return out

    def block_tiles(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(col0, (rows, cols) distances)`` of the current block's tiles (a reused buffer: valid until the next)."""
        for c0, c1 in self.tiles:
            yield c0, self._product(c0, c1)[: self.rows]

    def block_tile_slices(self, slices: list[tuple[int, int]]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(col0, slice index, distances of the slice's rows)`` for each tile of the current block and each
        ``(row0, row1)`` of ``slices`` (block-relative rows): the product is computed tile-wide, its distance
        arithmetic slice by slice, just before the slice is handed out (while the slice is in the CPU's cache)."""
        for c0, c1 in self.tiles:
            raw = self._raw_product(c0, c1)
            for i, (r0, r1) in enumerate(slices):
                part = raw[r0:r1]
                _to_distance(part, None if self.g_sq is None else self.g_sq[c0:c1],
                             None if self._q_sq is None else self._q_sq[r0:r1])
                yield c0, i, part

    def _raw_product(self, c0: int, c1: int) -> torch.Tensor:
        """The current block's ``q.g`` products with gallery columns ``c0:c1`` (the reused buffer)."""
        cols, height = c1 - c0, self._rows_q.shape[0]
        out = self._buffer[: height * cols].view(height, cols)
        torch.matmul(self._rows_q, self.gallery[c0:c1].to(self.dtype).T, out=out)
        return out

    def pairs(self, rows: torch.Tensor, cols: torch.Tensor, span: tuple[int, int] | None = None) -> torch.Tensor:
        """Distances of pairs ``(row, gallery index)``, bit-identical to the tiles'; ``rows`` count from the current
        block's first row, or from ``span[0]`` when ``span = (row0, row1)`` names a slice of the block (its own
        product: fewer rows, fewer distinct columns)."""
        r0, r1 = span if span is not None else (0, self.rows)
        if not self.gather:
            out = torch.empty(rows.shape, dtype=self.dtype, device=self.device)
            for c0, tile in self.block_tiles():
                inside = flatnonzero((cols >= c0) & (cols < c0 + tile.shape[1]))
                out[inside] = tile[rows[inside] + r0, cols[inside] - c0]
            return out
        uniq, inverse = torch.unique(cols, return_inverse=True)
        width = max(int(uniq.numel()), MIN_TILE_COLUMNS)
        take = torch.zeros(width, dtype=torch.int64, device=self.device)
        take[: uniq.numel()] = uniq
        # a slice of at least MIN_PRODUCT_ROWS rows is its own product; a thinner one reads the block's rows
        whole = r1 - r0 < MIN_PRODUCT_ROWS
        return self._product(0, width, take, None if whole else (r0, r1))[rows + (r0 if whole else 0), inverse]


def _rank_gallery(
    query: torch.Tensor,
    gallery: torch.Tensor,
    g_sq: torch.Tensor | None,
    ranker: GalleryRanker,
    q_pids: torch.Tensor,
    q_camids: torch.Tensor | None,
    plan: RankingPlan,
) -> QueryStats:
    """Per-query stats of all queries against the gallery as ``plan`` says (:func:`ranking_plan`): products of up
    to ``plan.product_rows`` query rows in tiles of ``plan.columns`` gallery columns, ranked ``plan.rank_rows`` rows
    at a time; identical stats whatever the plan (see :class:`TiledDistances`)."""
    tiled = TiledDistances(query, gallery, g_sq, plan.columns, plan.product_rows)
    parts = []
    for start, rows in tiled.blocks():
        subs = row_blocks(rows, plan.rank_rows)
        ids = [(q_pids[start + a : start + b], None if q_camids is None else q_camids[start + a : start + b])
               for a, b in subs]
        if len(tiled.tiles) == 1:  # whole rows at once: the positives are read off them
            parts.extend(ranker(dist, *ids[i]) for _, i, dist in tiled.block_tile_slices(subs))
            continue
        # Every ranking block is fed the same tiles; its exact pairs come first, from a product of its own rows.
        blocks = []
        for (a, b), (qp, qc) in zip(subs, ids):
            pairs = ranker.positive_and_junk_pairs(qp, qc)
            num_pos = pairs[0].numel()
            pair_d = tiled.pairs(torch.cat([pairs[0], pairs[2]]), torch.cat([pairs[1], pairs[3]]), (a, b))
            blocks.append(ranker.start(b - a, pairs, pair_d[:num_pos], pair_d[num_pos:]))
        for c0, i, dist in tiled.block_tile_slices(subs):
            blocks[i].add_tile(dist, c0)
        parts.extend(block.finish() for block in blocks)
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

    Same protocol and tie rule as ``evaluate_rank(compute_distance(...), ...)``: blocks of up to 1,024 query rows
    are turned into distances one gallery tile at a time and ranked 128 rows at a time by the sort-free core as the
    tiles arrive (:class:`~reid_lab.metrics.ranking_engine.BlockRanking`), so the working memory stays within
    ``memory_budget`` whatever the gallery size (10M x 256 included), time grows linearly with the gallery, and
    everything runs on the features' device. The result is bit-identical whatever the budget and the thread count
    (float32 on CPU: every product has 16 or more query rows, see :func:`_product_rows`), and equal to
    ``evaluate_rank(compute_distance(...))``'s. Without camera ids (both ``None``)
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
            ``normalize=False``); at least 32 MiB plus those. Not in it: the compiled ranking kernel's code, ~50 MB
            loaded once per process on first use.

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
    upcast = query.shape[1] if gallery.dtype != query.dtype else 0
    kernel = ranking_engine.CPU_KERNEL and device.type == "cpu"
    plan = ranking_plan(budget, num_query, num_gallery, query.dtype.itemsize, reserved, upcast, kernel,
                        CPU_TILE_COLUMNS if device.type == "cpu" else None)
    ranker = GalleryRanker(ids_tensor(g_pids, "g_pids", num_gallery, device), gc, num_cells=plan.cells or None,
                           kernel=kernel)
    with ranking_threads():  # the cores left free by other jobs (results do not depend on threads)
        stats = _rank_gallery(query, gallery, g_sq, ranker, qp, qc, plan)
    return RankResult.from_query_stats(stats, max_rank)
