"""LightningModules: the :class:`EmbeddingModule` base and its encoders' modules."""

from reid_lab.modules.base import EmbeddingModule, TrainingOutput
from reid_lab.modules.clip_reid import CLIPReIDModule
from reid_lab.modules.reid import ReIDModule

__all__ = ["CLIPReIDModule", "EmbeddingModule", "ReIDModule", "TrainingOutput"]
