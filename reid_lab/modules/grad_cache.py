"""GradCache: a contrastive batch larger than memory allows, with the exact full-batch gradient.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (RepL4NLP'21), used by
VLM2Vec to train at batch 1024. A contrastive loss couples every pair of the batch, so the batch cannot be
split into independent micro-batches. GradCache splits the *encoder* instead:

1. embed each chunk of ``chunk_size`` items without a graph (remembering the random state before each chunk);
2. compute the loss on the concatenated representations ``r`` (leaf tensors) and back-propagate it to get
   ``∂L/∂r`` (and the gradients of parameters the loss itself holds, e.g. a learnable temperature);
3. embed each chunk again *with* a graph, replaying its random state so dropout draws the same masks, and
   back-propagate the surrogate ``Σ r_chunk · stop_grad(∂L/∂r_chunk)``; by the chain rule the accumulated
   parameter gradients equal those of the loss on the whole batch.

Peak activation memory is one chunk's; the cost is one extra forward pass per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor


def chunk_slices(size: int, chunk_size: int) -> list[slice]:
    """``[0:c], [c:2c], ...`` covering ``range(size)``.

    >>> chunk_slices(5, 2)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [slice(i, min(i + chunk_size, size)) for i in range(0, size, chunk_size)]


def slice_batch(batch: dict[str, Any], rows: slice, size: int) -> dict[str, Any]:
    """The rows ``rows`` of every per-item entry of ``batch`` (tensors and lists of length ``size``)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, (Tensor, list, tuple)) and len(value) == size:
            out[key] = value[rows]
        else:
            out[key] = value
    return out


def _devices(batch: dict[str, Any]) -> list[int]:
    return sorted({v.device.index or 0 for v in batch.values() if isinstance(v, Tensor) and v.is_cuda})


def _restore(state: dict[str, Any]) -> None:
    """Set the CPU and CUDA random states captured by :func:`_capture`."""
    torch.set_rng_state(state["cpu"])
    for device, cuda_state in state["cuda"].items():
        torch.cuda.set_rng_state(cuda_state, device)


@contextmanager
def _replayed(state: dict[str, Any]) -> Iterator[None]:
    """Run the block from a captured random state (a chunk's second pass draws the first pass's numbers)."""
    _restore(state)
    yield


def _capture(devices: list[int]) -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(), "cuda": {d: torch.cuda.get_rng_state(d) for d in devices}}


def grad_cache_backward(
    batch: dict[str, Any],
    size: int,
    chunk_size: int,
    embed: Callable[[dict[str, Any]], dict[str, Tensor]],
    loss_fn: Callable[[dict[str, Tensor]], tuple[Tensor, Any]],
    backward: Callable[[Tensor], None] = Tensor.backward,
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
    slicer: Callable[[dict[str, Any], slice, int], dict[str, Any]] = slice_batch,
    params: Iterable[Tensor] = (),
) -> tuple[Tensor, Any]:
    """Accumulate the full-batch gradient of ``loss_fn(embed(batch))`` into the parameters' ``.grad``, chunk-wise.

    Args:
        batch: the training batch; its per-item entries (length ``size``) are cut into chunks.
        size: items in the batch.
        chunk_size: items embedded at once (the memory bound).
        embed: ``chunk -> {modality: (b, D)}`` representations (with a graph when grad is enabled).
        loss_fn: ``{modality: (B, D)} -> (loss, extra)`` on the whole batch's representations.
        backward: how to back-propagate a scalar (Lightning's ``manual_backward`` under a Trainer).
        no_sync: a context that defers DDP's gradient all-reduce (entered for all but the last backward). Under
            DDP the last chunk's backward then all-reduces the gradients every earlier backward accumulated
            locally (the reducer reads ``.grad``, accumulated ones included): one all-reduce per step.
        params: the trainable parameters. Each enters the last backward with weight 0, so DDP's reducer hears from
            every one of them there, also from those only the loss holds (a learnable temperature, an upgrade
            host's adapters), whose gradients came in the loss's own (unsynchronised) backward.
        slicer: ``(batch, rows, size) -> chunk`` (default :func:`slice_batch`; a pair batch with hard negatives
            slices its ``K`` negatives per pair along).

    Returns:
        The loss (detached) and ``extra`` from ``loss_fn``.
    """
    slices = chunk_slices(size, chunk_size)
    devices = _devices(batch)
    states, cached = [], []
    with torch.no_grad():
        for rows in slices:
            states.append(_capture(devices))
            cached.append(embed(slicer(batch, rows, size)))
    after = _capture(devices)
    reps = {m: torch.cat([c[m] for c in cached]).detach().requires_grad_(True) for m in cached[0]}
    loss, extra = loss_fn(reps)
    with no_sync():
        backward(loss)
    grads = {m: r.grad if r.grad is not None else torch.zeros_like(r) for m, r in reps.items()}
    starts = {m: 0 for m in reps}  # each chunk's rows of every representation (negatives: K per pair)
    for i, rows in enumerate(slices):
        sync = nullcontext() if i == len(slices) - 1 else no_sync()
        with sync, _replayed(states[i]):
            chunk = embed(slicer(batch, rows, size))
            parts = {}
            for m in chunk:
                n = cached[i][m].shape[0]
                parts[m] = grads[m][starts[m]:starts[m] + n]
                starts[m] += n
            surrogate = sum((chunk[m] * parts[m]).sum() for m in chunk)
            if i == len(slices) - 1:
                surrogate = surrogate + sum((0.0 * p.sum() for p in params), surrogate.new_zeros(()))
            backward(surrogate)
    _restore(after)  # continue from where the first pass left the random state
    return loss.detach(), extra
