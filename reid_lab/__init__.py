"""reid_lab: person re-identification and multi-modal embeddings with compatible model upgrades.

``reid_lab.load_embedder(checkpoint)`` turns any trained checkpoint into a callable embedder
(:mod:`reid_lab.modules.inference`); everything else lives in the subpackages.
"""

__all__ = ["load_embedder"]


def __getattr__(name: str):
    if name == "load_embedder":  # lazy: importing reid_lab stays cheap
        from reid_lab.modules.inference import load_embedder

        return load_embedder
    raise AttributeError(f"module 'reid_lab' has no attribute {name!r}")
