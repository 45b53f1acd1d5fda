"""``python -m reid_lab``: the ``reid-lab`` command (:func:`reid_lab.cli.main`), for environments without the
console script on ``PATH``."""

import sys

from reid_lab.cli import main

if __name__ == "__main__":
    sys.exit(main())
