"""The embedding core shared by every encoder: the encoder contract, embedding-space records, feature files
and the one path that embeds a split."""

from reid_lab.embedding.checkpoint import load_encoder
from reid_lab.embedding.embedder import Embedder
from reid_lab.embedding.encoder import MODALITIES, Encoder, build_encoder
from reid_lab.embedding.features import FeatureSet
from reid_lab.embedding.space import IncompatibleSpacesError, check_compatible, make_space

__all__ = [
    "MODALITIES",
    "Embedder",
    "Encoder",
    "FeatureSet",
    "IncompatibleSpacesError",
    "build_encoder",
    "check_compatible",
    "load_encoder",
    "make_space",
]
