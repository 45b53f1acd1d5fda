"""Subprocess-per-implementation benchmark runner: wall, CPU, peak RSS, load average, one JSON line per run.

Driver side (:func:`spawn`): every run is a fresh child process (``python <script> --child ...``), optionally
under ``RLIMIT_AS`` (``mem_gb``: a MemoryError in the child instead of the OOM killer on a shared box). The child
prints one line ``BENCH_JSON {...}``; the driver parses it, echoes it, and keeps it.

Child side (:func:`measure`): inputs are loaded first; then the peak-RSS counter is reset
(``/proc/self/clear_refs`` = 5, Linux >= 4.0) so ``extra_rss_gb`` = peak resident memory during the call minus
the resident memory before it, i.e. what the implementation allocates beyond its loaded inputs. ``peak_rss_gb`` is the
child's whole peak (interpreter + inputs + call) from VmHWM. ``ru_maxrss_gb`` (``resource.getrusage(RUSAGE_SELF)``)
is kept in the JSON line but overstates small children: Linux folds the pre-``exec`` image, i.e. the forked
driver's resident memory, into it.
Only the standard library is imported here: the peers' children run in a venv with numpy only.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

MARKER = "BENCH_JSON "
GB = 2**30


def load_average() -> float:
    """1-minute load average."""
    return os.getloadavg()[0]


def rss_now_gb() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / GB


def _hwm_gb() -> float | None:
    """Peak resident set size since the last reset (VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """Run ``fn`` once (inputs already loaded) and return its metrics plus wall / CPU / memory / load fields."""
    rss_before = rss_now_gb()
    hwm_load = _hwm_gb()  # peak of imports, loading and warm-up
    reset = _reset_hwm()
    load = load_average()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    metrics = fn()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    hwm = _hwm_gb() if reset else None
    ru_maxrss = after.ru_maxrss * 1024 / GB  # Linux reports KiB
    peak = max(hwm_load or 0.0, hwm) if hwm is not None else ru_maxrss
    record = {
        **fields,
        "wall_s": wall,
        "cpu_s": (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime),
        "peak_rss_gb": peak,
        "ru_maxrss_gb": ru_maxrss,
        "input_rss_gb": rss_before,
        "extra_rss_gb": (hwm if hwm is not None else peak) - rss_before,
        "load1": load,
        "load1_end": load_average(),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
        **metrics,
    }
    return record


def emit(record: dict[str, Any]) -> None:
    """Print a child's result line for the driver."""
    print(MARKER + json.dumps(record), flush=True)


def spawn(
    argv: Sequence[str],
    *,
    python: str | os.PathLike[str] = sys.executable,
    mem_gb: float | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    label: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``python argv...`` in a fresh process and return its ``BENCH_JSON`` record.

    A child that fails (non-zero exit, MemoryError, timeout) gives ``{"error": ...}`` with the tail of its stderr.
    """
    def limit() -> None:
        if mem_gb:
            cap = int(mem_gb * GB)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    record: dict[str, Any] = dict(label or {})
    try:
        proc = subprocess.run(
            [str(python), *argv], capture_output=True, text=True, env=env, preexec_fn=limit, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        record["error"] = f"timeout after {timeout_s} s"
        return record
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        record["error"] = f"exit {proc.returncode}: " + " | ".join(tail)
        return record
    record.update(json.loads(lines[-1][len(MARKER):]))
    return record


def child_env(threads: int) -> dict[str, str]:
    """Environment for children: same thread count for every implementation."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    # reid_lab's ranking paths pick threads from the load average; a side-by-side ratio needs both sides at the
    # same threads, so pin them (unless the caller pinned something else)
    env.setdefault("REID_LAB_RANK_THREADS", str(threads))
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def best_of(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per implementation: the run with the minimum wall time, with ``runs``, ``wall_max_s``, ``cpu_min_s`` and
    the maximum peak / extra RSS over its runs (memory is reported conservatively, time optimistically)."""
    out: dict[str, dict[str, Any]] = {}
    for impl in dict.fromkeys(r["impl"] for r in records):
        ok = [r for r in records if r["impl"] == impl and "error" not in r]
        if not ok:
            out[impl] = next(r for r in records if r["impl"] == impl)
            continue
        best = dict(min(ok, key=lambda r: r["wall_s"]))
        best["runs"] = len(ok)
        best["wall_max_s"] = max(r["wall_s"] for r in ok)
        best["cpu_min_s"] = min(r["cpu_s"] for r in ok)
        best["peak_rss_gb"] = max(r["peak_rss_gb"] for r in ok)
        best["extra_rss_gb"] = max(r["extra_rss_gb"] for r in ok)
        out[impl] = best
    return out


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (floats formatted by the caller)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
