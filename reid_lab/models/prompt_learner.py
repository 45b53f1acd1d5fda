"""CLIP-ReID's identity prompts (Li, Sun & Li, "CLIP-ReID: Exploiting Vision-Language Model for Image
Re-Identification without Concrete Text Labels", AAAI'23, §3.2) and open_clip's text transformer run from
token *embeddings*.

Each training identity ``c`` gets ``n_ctx`` learnable word vectors ``[X]_1 ... [X]_n`` that replace the
placeholder words of the template "A photo of a X X X X person." (official ``PromptLearner``, ``n_ctx = 4``).
The other tokens (start-of-text, "a photo of a", "person.", end-of-text, padding) keep the frozen token
embedding of the text tower. :func:`encode_text_embeddings` then does exactly what open_clip's
``CLIP.encode_text`` does after its token lookup: + positional embedding, the transformer with the causal
mask, ``ln_final``, pooling at the end-of-text position of the template, the text projection.

Deviation from the official code: the official ``PromptLearner`` stores the template's prefix / suffix
embeddings as buffers taken at construction time; here they are looked up in the text tower's token
embedding on every call, so a prompt learner built before the tower's weights were loaded (stage 2 reads
stage 1's checkpoint after construction) never holds stale embeddings. The tower is frozen in both stages,
so the values are the same.
"""

from __future__ import annotations

import open_clip
import torch
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

DEFAULT_TEMPLATE = "A photo of a {} person."
PLACEHOLDER = "X"


def open_clip_text_model(clip_model: nn.Module) -> open_clip.model.CLIP:
    """``clip_model`` if its text tower is open_clip's own transformer; otherwise a clear error.

    CLIP-ReID's prompts are spliced into the token embeddings of open_clip's text transformer (the built-in
    ``text_cfg``: ``width`` / ``heads`` / ``layers``). A Hugging Face text tower (``text_tower: minilm_l6``,
    open_clip's ``CustomTextCLIP``) is not supported.
    """
    if isinstance(clip_model, open_clip.model.CLIP):
        return clip_model
    raise ValueError(
        f"CLIP-ReID prompts need open_clip's own text transformer (open_clip.model.CLIP, built from a model_cfg "
        f"text_cfg with width / heads / layers, e.g. configs/model/clip_tiny.yaml); this encoder's model is a "
        f"{type(clip_model).__name__} (a Hugging Face text tower such as text_tower: minilm_l6 is not supported)"
    )


def encode_text_embeddings(clip_model: nn.Module, embeddings: Tensor, tokens: Tensor) -> Tensor:
    """open_clip's ``CLIP.encode_text`` from token embeddings instead of token ids.

    Args:
        clip_model: an ``open_clip.model.CLIP`` (its own text transformer).
        embeddings: ``(B, L, width)`` token embeddings (e.g. ``token_embedding(tokens)`` with some rows replaced).
        tokens: ``(B, L)`` or ``(1, L)`` token ids whose end-of-text position is pooled (the tokens the
            embeddings stand for; learnable rows may stand for any placeholder token).

    Returns:
        ``(B, D)`` text features, not normalised (as ``encode_text(tokens)`` when ``embeddings`` equals
        ``token_embedding(tokens)``).
    """
    model = open_clip_text_model(clip_model)
    cast_dtype = model.transformer.get_cast_dtype()
    if tokens.shape[0] != embeddings.shape[0]:
        tokens = tokens.expand(embeddings.shape[0], -1)
    x = embeddings.to(cast_dtype) + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return x


class PromptLearner(nn.Module):
    """Per-identity learnable context words in a fixed template (CLIP-ReID's ``PromptLearner``).

    Args:
        num_classes: training identities ``C``.
        width: token-embedding width of the text transformer.
        tokenizer: the text tower's tokenizer (``list[str] -> (N, L)`` ids), used once for the template.
        n_ctx: learnable words per identity (CLIP-ReID: 4).
        template: the sentence with ``{}`` where the ``n_ctx`` placeholder words go (CLIP-ReID person:
            "A photo of a {} person."; vehicles: "A photo of a {} vehicle.").
        init_std: the context vectors start from ``N(0, init_std^2)`` (CLIP-ReID: 0.02).

    Attributes:
        cls_ctx: ``(C, n_ctx, width)`` the learnable words.
        tokens: ``(1, L)`` token ids of the template with its placeholders (non-persistent buffer).
        start: index of the first placeholder token in ``tokens``.
    """

    def __init__(self, num_classes: int, width: int, tokenizer, n_ctx: int = 4,
                 template: str = DEFAULT_TEMPLATE, init_std: float = 0.02) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be the number of training identities (> 0), got {num_classes}")
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        if template.count("{}") != 1:
            raise ValueError(f"template must hold one '{{}}' where the identity words go, got {template!r}")
        self.template = template
        self.n_ctx = int(n_ctx)
        self.prompt = template.format(" ".join([PLACEHOLDER] * n_ctx))
        tokens = tokenizer([self.prompt]).long()
        placeholder = tokenizer([PLACEHOLDER]).long()[0, 1]  # [start-of-text, X, end-of-text, pad ...]
        positions = (tokens[0] == placeholder).nonzero().flatten()
        if len(positions) != n_ctx or int(positions[-1] - positions[0]) != n_ctx - 1:
            raise ValueError(f"the template {template!r} must tokenize {n_ctx} consecutive placeholders "
                             f"{PLACEHOLDER!r}; found them at positions {positions.tolist()}")
        self.start = int(positions[0])
        self.register_buffer("tokens", tokens, persistent=False)
        self.cls_ctx = nn.Parameter(torch.randn(num_classes, n_ctx, width) * init_std)

    @property
    def num_classes(self) -> int:
        return self.cls_ctx.shape[0]

    def forward(self, pids: Tensor, token_embedding: nn.Embedding) -> Tensor:
        """``(B,)`` identities -> ``(B, L, width)`` prompt embeddings (frozen template words + their ``cls_ctx``)."""
        template = token_embedding(self.tokens).expand(pids.shape[0], -1, -1)
        ctx = self.cls_ctx[pids].to(template.dtype)
        end = self.start + self.n_ctx
        return torch.cat([template[:, :self.start], ctx, template[:, end:]], dim=1)

    def encode(self, clip_model: nn.Module, pids: Tensor) -> Tensor:
        """``(B,)`` identities -> ``(B, D)`` text features of their prompts (not normalised)."""
        model = open_clip_text_model(clip_model)
        return encode_text_embeddings(model, self(pids, model.token_embedding), self.tokens)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, n_ctx={self.n_ctx}, prompt={self.prompt!r}"
