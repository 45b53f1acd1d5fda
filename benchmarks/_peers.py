"""Install / locate the peers' rank evaluators (fast-reid, torchreid) under ``benchmarks/.cache/`` for benchmarks.

Nothing of the peers is copied into the repository: everything lands in the git-ignored cache, built by this
module on first use, so a benchmark is reproducible from a clean checkout.

* A cache venv ``benchmarks/.cache/eval-venv`` (same base interpreter as ours) with numpy (pinned to our
  version, so ``np.argsort`` is the same code), Cython and setuptools only: no torch, no peer package.
* fast-reid: the PyPI wheel ``fastreid==1.4.0`` (``pip download --no-deps``) carries
  ``fastreid/evaluation/rank.py`` and ``rank_cylib/rank_cy.pyx``; only those two files are extracted.
* torchreid: the PyPI sdist ``torchreid==0.2.5`` has ``rank.py`` but NOT ``rank_cy.pyx`` (its Cython evaluator
  cannot be built from PyPI), so both files come from a git snapshot of KaiyangZhou/deep-person-reid
  (``git show HEAD:torchreid/metrics/...``). The snapshot is looked up in ``$REID_LAB_TORCHREID_GIT`` (a git
  dir), then ``/work/.mirror/*deep-person-reid*/repo``; its commit is recorded.
* The Cython extension is built in place (``build_ext --inplace``) with the cache venv.

Import only the leaf evaluator module: :func:`import_leaf` registers empty stub parent packages whose
``__path__`` points into the extracted tree, so ``fastreid/__init__.py`` (which pulls torch, yacs, ...) never runs.
"""

from __future__ import annotations

import glob
import importlib
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parent
CACHE = BENCH_DIR / ".cache"
VENV = CACHE / "eval-venv"
PEERS = CACHE / "peers"
FASTREID_VERSION = "1.4.0"
TORCHREID_REPO = "KaiyangZhou/deep-person-reid"

# peer name -> (leaf module, files relative to the source root)
LEAVES = {
    "fastreid": ("fastreid.evaluation.rank", "fastreid/evaluation"),
    "torchreid": ("torchreid.metrics.rank", "torchreid/metrics"),
}

_BUILD = """
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
setup(name="rank_cy", script_args=["build_ext", "--inplace"],
      ext_modules=cythonize([Extension("rank_cy", ["rank_cy.pyx"], include_dirs=[np.get_include()])],
                            quiet=True, language_level=3))
"""


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def _log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def venv_python() -> Path:
    """The cache venv's python, created on first use (numpy pinned to ours, cython, setuptools)."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    if stamp.exists():
        return python
    import numpy as np  # the driver's numpy: the peers get the same version

    base = getattr(sys, "_base_executable", sys.executable)
    _log(f"creating {VENV} from {base}")
    _run([base, "-m", "venv", str(VENV)])
    _run([str(python), "-m", "pip", "install", "--quiet", f"numpy=={np.__version__}", "cython", "setuptools"])
    stamp.write_text(_run([str(python), "-m", "pip", "freeze"]))
    return python


def _build_cython(src_dir: Path) -> None:
    _log(f"building rank_cy in {src_dir}")
    _run([str(venv_python()), "-c", _BUILD], cwd=src_dir)
    if not glob.glob(str(src_dir / "rank_cy*.so")) and not glob.glob(str(src_dir / "rank_cy*.pyd")):
        raise RuntimeError(f"rank_cy was not built in {src_dir}")


def fastreid_root() -> Path:
    """Source root holding ``fastreid/evaluation/{rank.py, rank_cylib/rank_cy*.so}`` from the PyPI wheel."""
    root = PEERS / f"fastreid-{FASTREID_VERSION}"
    stamp = root / ".built"
    if stamp.exists():
        return root
    download = CACHE / "downloads"
    download.mkdir(parents=True, exist_ok=True)
    wheel = download / f"fastreid-{FASTREID_VERSION}-py3-none-any.whl"
    if not wheel.exists():
        _log(f"pip download fastreid=={FASTREID_VERSION}")
        _run([str(venv_python()), "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
              f"fastreid=={FASTREID_VERSION}", "-d", str(download)])
    with zipfile.ZipFile(wheel) as zf:
        for name in ("fastreid/evaluation/rank.py", "fastreid/evaluation/rank_cylib/rank_cy.pyx"):
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    _build_cython(root / "fastreid/evaluation/rank_cylib")
    stamp.write_text(f"PyPI fastreid=={FASTREID_VERSION}\n")
    return root


def _torchreid_git_dir() -> Path:
    env = os.environ.get("REID_LAB_TORCHREID_GIT")
    candidates = [env] if env else sorted(glob.glob("/work/.mirror/*deep-person-reid*/repo"))
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise RuntimeError(
        "torchreid's Cython evaluator is not in the PyPI sdist (torchreid 0.2.5 ships no rank_cy.pyx): point "
        f"$REID_LAB_TORCHREID_GIT at a git dir of {TORCHREID_REPO} (e.g. a bare clone)"
    )


def torchreid_root() -> Path:
    """Source root holding ``torchreid/metrics/{rank.py, rank_cylib/rank_cy*.so}`` from a git snapshot."""
    git_dir = _torchreid_git_dir()
    commit = _run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"]).strip()
    root = PEERS / f"torchreid-{commit[:7]}"
    stamp = root / ".built"
    if stamp.exists():
        return root
    for name in ("torchreid/metrics/rank.py", "torchreid/metrics/rank_cylib/rank_cy.pyx"):
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_run(["git", "--git-dir", str(git_dir), "show", f"HEAD:{name}"]))
    _build_cython(root / "torchreid/metrics/rank_cylib")
    stamp.write_text(f"{TORCHREID_REPO}@{commit}\n")
    return root


def peer_root(peer: str) -> Path:
    """Install (first call) and return the source root of ``peer`` ("fastreid" or "torchreid")."""
    return {"fastreid": fastreid_root, "torchreid": torchreid_root}[peer]()


def peer_source(root: Path) -> str:
    """Where the extracted files came from (PyPI version or repository@commit)."""
    stamp = root / ".built"
    return stamp.read_text().strip() if stamp.exists() else "?"


def import_leaf(peer: str, root: str | Path) -> ModuleType:
    """Import only the peer's leaf ``rank`` module from ``root``, through stub parent packages.

    Runs in the cache venv's child process; needs numpy only.
    """
    module_name, _ = LEAVES[peer]
    parts = module_name.split(".")
    for depth in range(1, len(parts)):
        name = ".".join(parts[:depth])
        stub = types.ModuleType(name)
        stub.__path__ = [str(Path(root, *parts[:depth]))]
        sys.modules[name] = stub
    return importlib.import_module(module_name)
