"""What the benchmarks share: where they write, how they run tessera, how they measure memory,
and how they report (a human table on stdout, then one JSON object per benchmark).

A benchmark prints numbers and asserts nothing about time.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(os.environ.get("TESSERA_BENCH_DIR", REPO / ".cache" / "bench"))
# A line of stdout that starts with this holds one benchmark's JSON object (run_all collects them).
JSON_PREFIX = "BENCH_JSON "


def machine() -> dict:
    """Where the numbers were taken: they mean little without it."""
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": _has_gpu(),
        "python": platform.python_version(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def tessera_bin() -> str:
    """The `tessera` next to this interpreter (the project venv's), else the one on PATH."""
    candidate = Path(sys.executable).with_name("tessera")
    return str(candidate) if candidate.exists() else "tessera"


def bench_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


def run_tessera(spec_path: Path, run_id: str, log_path: Path, sample_memory: bool = False) -> dict:
    """`tessera run SPEC --run-id RUN_ID` as a user runs it; its wall time, exit code and,
    if asked, the peak PSS of its whole process tree (driver, raylet, workers, actors)."""
    command = [tessera_bin(), "run", str(spec_path), "--run-id", run_id]
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=bench_env(), cwd=REPO)
        with PssSampler(process.pid) if sample_memory else _nothing() as sampler:
            code = process.wait()
    result = {"wall_s": round(time.perf_counter() - started, 2), "exit_code": code, "log": str(log_path)}
    if sample_memory:
        result["peak_pss_mib"] = round(sampler.peak_bytes / 2**20, 1)
        result["pss_samples"] = sampler.samples
        result["peak_pss_mib_by_role"] = {
            role: {"mib": round(entry["pss"] / 2**20, 1), "processes": entry["processes"]}
            for role, entry in sorted(sampler.peak_by_role.items(), key=lambda item: -item[1]["pss"])
        }
    if code != 0:
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"tessera run exited {code}; log {log_path}:\n{tail}")
    return result


@contextmanager
def _nothing():
    yield None


class PssSampler:
    """Samples the PSS of a process and all its descendants every `interval` seconds.

    PSS (proportional set size) splits each shared page among the processes that map it, so
    Ray's shared-memory object store and shared libraries count once, not once per worker.
    At the peak it also keeps the PSS by kind of process (`peak_by_role`), to say what grew.
    """

    def __init__(self, pid: int, interval: float = 0.5):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_bytes = 0
        self.peak_by_role: dict[str, dict] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "PssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            by_role = tree_pss_by_role(self.root)
            total = sum(entry["pss"] for entry in by_role.values())
            if total:
                self.samples += 1
                if total > self.peak_bytes:
                    self.peak_bytes, self.peak_by_role = total, by_role
            self._stop.wait(self.interval)


def tree_pss_by_role(root: psutil.Process) -> dict[str, dict]:
    """PSS bytes and process count of a process tree, by role: the driver, each Ray daemon,
    and Ray workers by what they run (Ray names a busy worker `ray::<task or actor>`)."""
    try:
        processes = [root] + root.children(recursive=True)
    except psutil.Error:
        return {}
    by_role: dict[str, dict] = {}
    for process in processes:
        try:
            pss = process.memory_full_info().pss
            role = "driver" if process.pid == root.pid else process_role(process)
        except psutil.Error:  # exited between listing and reading: it holds nothing now
            continue
        entry = by_role.setdefault(role, {"pss": 0, "processes": 0})
        entry["pss"] += pss
        entry["processes"] += 1
    return by_role


def process_role(process: psutil.Process) -> str:
    name = process.name()
    if name.startswith("ray::"):
        # ray::MapWorker(MapBatches(Predictor)), ray::IDLE, ray::ReadManifest->...: keep the head.
        return "worker " + name[5:].split("(")[0][:40]
    cmdline = " ".join(process.cmdline()[:3])
    for daemon in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "plasma"):
        if daemon in cmdline:
            return daemon
    return name[:40]


def emit(result: dict, rows: list[tuple[str, str]]) -> None:
    """The human table, then the machine-readable object on one prefixed line."""
    width = max(len(label) for label, _ in rows)
    print(f"\n== {result['benchmark']} ==")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    print(JSON_PREFIX + json.dumps(result, sort_keys=True), flush=True)


def write_result(result: dict, name: str) -> Path:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True))
    return path


def read_summary(output_path: Path, run_id: str) -> dict:
    return json.loads((output_path / "_runs" / run_id / "summary.json").read_text())
