"""The ``reid-lab`` command: the project's own subcommands, else the LightningCLI.

``reid-lab fit | validate | test | predict`` runs :mod:`reid_lab.lightning_cli`; ``synth``, ``upgrade`` and
``index`` are plain argparse programs of their own layers, dispatched before LightningCLI starts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _synth(argv: list[str]) -> int:
    from reid_lab.data.synthetic import main

    return main(argv)


def _upgrade(argv: list[str]) -> int:
    from reid_lab.studies.study import main

    return main(argv)


def _index(argv: list[str]) -> int:
    from reid_lab.retrieval.cli import main

    return main(argv)


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {"synth": _synth, "upgrade": _upgrade, "index": _index}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reid-lab`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return int(SUBCOMMANDS[argv[0]](argv[1:]) or 0)
    from reid_lab.lightning_cli import run_lightning_cli

    run_lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
