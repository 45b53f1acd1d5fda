"""LightningModules."""

from reid_lab.modules.reid import ReIDModule

__all__ = ["ReIDModule"]
