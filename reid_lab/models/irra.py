"""IRRA's implicit relation reasoning parts (Jiang & Ye, "Cross-Modal Implicit Relation Reasoning and Aligning
for Text-to-Image Person Retrieval", CVPR'23): the token-level outputs of an open_clip dual encoder, the
cross-modal fusion block and the masked-language-modelling head.

* :func:`image_tokens` / :func:`text_tokens`: one forward pass of a tower returning its pooled embedding (equal to
  ``encode_image`` / ``encode_text``) and every token's state projected into the shared space, as IRRA's CLIP
  returns ``x @ proj`` for all tokens (the image's class token and patches; every caption position).
* :class:`CrossModalMLM`: IRRA's ``cross_former`` + ``mlm_head``: text tokens (queries, layer-normed) attend to the
  image tokens (keys / values) in one multi-head cross-attention, then ``depth`` transformer layers over the
  text positions and a final LayerNorm; the head (dense, QuickGELU, LayerNorm, linear to the vocabulary)
  predicts the caption's masked tokens. Initialisation follows IRRA's ``model/build.py``. Heads default to
  IRRA's ``embed_dim // 64`` (at least 1).

Deviation: the head is evaluated only at the positions that carry an MLM label (IRRA scores every position
and lets the cross-entropy ignore the rest; the loss is the same, the ``(B, L, vocab)`` logits are not made).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import torch
from open_clip.transformer import LayerNorm, QuickGELU, Transformer, VisionTransformer, text_global_pool
from torch import Tensor, nn


@contextmanager
def _with_tokens(tower: nn.Module):
    """open_clip's towers return ``(pooled, tokens)`` while ``output_tokens`` is set."""
    previous = tower.output_tokens
    tower.output_tokens = True
    try:
        yield
    finally:
        tower.output_tokens = previous


def image_tokens(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, 3, H, W) -> ((B, D) pooled, (B, 1 + N, D) tokens)`` of an open_clip model's image tower.

    The pooled embedding equals ``model.encode_image(images)``. With open_clip's ViT the tokens are the pooled
    (class) token followed by the ``N`` patch tokens after ``ln_post``, all through the tower's projection;
    with a reid_lab backbone tower (:class:`~reid_lab.models.clip.BackboneImageTower`) they are the pooled
    feature followed by the ``H' x W'`` cells of the last feature map, through its projection.
    """
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        with _with_tokens(visual):
            pooled, patches = visual(images)
        if visual.proj is not None:
            patches = patches @ visual.proj
        return pooled, torch.cat([pooled.unsqueeze(1), patches], dim=1)
    if hasattr(visual, "backbone") and hasattr(visual, "proj"):  # BackboneImageTower
        feature_map = visual.backbone(images)
        if feature_map.dim() != 4:
            raise ValueError(f"image backbone {type(visual.backbone).__name__} gives no spatial feature map: IRRA's "
                             "cross-attention needs image tokens")
        pooled = visual.proj(visual.pool(feature_map).flatten(1))
        cells = visual.proj(feature_map.flatten(2).transpose(1, 2))
        return pooled, torch.cat([pooled.unsqueeze(1), cells], dim=1)
    raise ValueError(f"image tower {type(visual).__name__} has no token outputs for IRRA's cross-attention; use "
                     "open_clip's ViT or a reid_lab backbone (image_backbone)")


def text_tokens(model: nn.Module, ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, L)`` token ids ``-> ((B, D) pooled, (B, L, D) token states)`` of an open_clip model's text tower.

    The pooled embedding equals ``model.encode_text(ids)``; the states are every position after the final
    LayerNorm (open_clip's transformer) or the last hidden layer (a Hugging Face tower), through the tower's
    projection into the shared space, so position ``l`` is the state of ``ids[:, l]``.
    """
    if hasattr(model, "text"):  # CustomTextCLIP: open_clip TextTransformer or a Hugging Face tower
        tower = model.text
        with _with_tokens(tower):
            pooled, states = tower(ids)
        projection = getattr(tower, "text_projection", None)
        if projection is None and hasattr(tower, "proj"):
            projection = tower.proj
    else:  # open_clip's CLIP: the text tower's modules live on the model itself (as in its encode_text)
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(ids).to(cast) + model.positional_embedding.to(cast)
        states = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        pooled = text_global_pool(states, ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        projection = model.text_projection
        if projection is not None:
            pooled = projection(pooled) if isinstance(projection, nn.Module) else pooled @ projection
    if states.shape[1] != ids.shape[1]:
        raise ValueError(f"the text tower returns {states.shape[1]} token states for {ids.shape[1]} ids (a class-token "
                         "pooler drops one); IRRA's MLM needs one state per caption position")
    if projection is not None:
        states = projection(states) if isinstance(projection, nn.Module) else states @ projection
    return pooled, states


class CrossModalMLM(nn.Module):
    """IRRA's cross-modal fusion block and MLM head: ``(text states, image tokens) -> vocabulary logits``.

    Args:
        embed_dim: ``D``, the shared space of :func:`image_tokens` / :func:`text_tokens`.
        vocab_size: ids the text tower knows (the head's classes).
        depth: transformer layers after the cross-attention (IRRA: 4, ``cmt_depth``).
        heads: attention heads; None: ``max(1, embed_dim // 64)`` as IRRA.
    """

    def __init__(self, embed_dim: int, vocab_size: int, depth: int = 4, heads: int | None = None) -> None:
        super().__init__()
        heads = max(1, embed_dim // 64) if heads is None else int(heads)
        if depth < 0 or embed_dim % heads:
            raise ValueError(f"IRRA fusion: depth must be >= 0 and embed_dim ({embed_dim}) a multiple of heads "
                             f"({heads}); got depth {depth}")
        self.vocab_size = int(vocab_size)
        self.cross_attn = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
        self.transformer = Transformer(width=embed_dim, layers=depth, heads=heads, batch_first=True)
        self.ln_pre_t, self.ln_pre_i, self.ln_post = LayerNorm(embed_dim), LayerNorm(embed_dim), LayerNorm(embed_dim)
        self.mlm_head = nn.Sequential(OrderedDict([
            ("dense", nn.Linear(embed_dim, embed_dim)), ("gelu", QuickGELU()), ("ln", LayerNorm(embed_dim)),
            ("fc", nn.Linear(embed_dim, vocab_size)),
        ]))
        # IRRA's initialisation (CLIP's rule for its residual blocks)
        scale = embed_dim ** -0.5
        proj_std, attn_std, fc_std = scale * (2 * max(depth, 1)) ** -0.5, scale, (2 * embed_dim) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.cross_attn.in_proj_weight, std=attn_std)
        nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)
        nn.init.normal_(self.mlm_head.dense.weight, std=fc_std)
        nn.init.normal_(self.mlm_head.fc.weight, std=proj_std)

    def fuse(self, text: Tensor, image: Tensor) -> Tensor:
        """``(B, L, D)`` text states, ``(B, T, D)`` image tokens ``-> (B, L, D)`` image-conditioned text states."""
        image = self.ln_pre_i(image)
        x = self.cross_attn(self.ln_pre_t(text), image, image, need_weights=False)[0]
        return self.ln_post(self.transformer(x))

    def forward(self, text: Tensor, image: Tensor, positions: Tensor | None = None) -> Tensor:
        """Vocabulary logits: ``(B, L, vocab)``, or ``(M, vocab)`` at the ``M`` True entries of the ``(B, L)``
        boolean ``positions`` (the masked tokens)."""
        fused = self.fuse(text, image)
        return self.mlm_head(fused if positions is None else fused[positions])
