"""What the fetch stage reaches in one worker: `storage.fetch` against the loopback S3 server.

The server (moto, tests/s3server.py) runs in its own process, as an endpoint would; this
process plays one CPU worker and fetches objects one after another, as `prepare` does. For
each object size it prints MB/s, objects/s and requests per object, next to a plain s3fs
`info` + `cat_file` (what the storage layer did before: a HEAD, another HEAD, a GET).

    .venv/bin/python -m benchmarks.fetch [--total-mb 64]

Against a local, single-threaded Python server these are a lower bound on what the code can
do and an upper bound on nothing: the server, not the client, is usually the limit here. A
benchmark prints numbers and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / ".cache" / "bench" / "fetch.json"
JSON_PREFIX = "BENCH_JSON "  # one benchmark's result on one line (benchmarks/common.py's convention)

SIZES_KIB = (64, 512, 4096, 16384)
BUCKET = "tessera-bench-fetch"


def start_server() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "s3server.py")], stdout=subprocess.PIPE, text=True
    )
    line = process.stdout.readline().strip()
    if not line.startswith("S3 endpoint "):
        process.terminate()
        raise RuntimeError(f"the S3 server did not start: {line!r}")
    return process, line.split()[-1]


def measure(label: str, uris: list[str], get, size: int) -> dict:
    laps = []
    started = time.perf_counter()
    for uri in uris:
        lap = time.perf_counter()
        data = get(uri)
        laps.append(time.perf_counter() - lap)
        assert len(data) == size
    wall = time.perf_counter() - started
    return {
        "how": label,
        "object_kib": size // 1024,
        "objects": len(uris),
        "mb_per_s": round(len(uris) * size / 1e6 / wall, 1),
        "objects_per_s": round(len(uris) / wall, 1),
        "p50_ms": round(statistics.median(laps) * 1000, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="storage.fetch MB/s in one worker against a loopback S3 server")
    parser.add_argument("--total-mb", type=float, default=64, help="bytes fetched per object size and method")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "tests"))
    from s3server import credentials_env

    os.environ.update(credentials_env())
    import s3fs

    from pipeline import storage
    from schemas.spec import StorageSpec

    load_at_start = os.getloadavg()[0]
    endpoint_note = "moto (tests/s3server.py) in its own process on 127.0.0.1"
    server, endpoint = start_server()
    try:
        spec = StorageSpec(endpoint_url=endpoint)
        admin = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": endpoint})
        admin.mkdir(BUCKET)
        plain = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": endpoint})
        policy = storage.FetchPolicy(max_bytes=64 * 2**20)
        rows = []
        for kib in SIZES_KIB:
            size = kib * 1024
            count = max(4, min(400, int(args.total_mb * 1e6 // size)))
            payload = os.urandom(size)
            uris = [f"s3://{BUCKET}/{kib}k/{i:04d}.bin" for i in range(count)]
            for uri in uris:
                admin.pipe_file(uri, payload)
            storage.fetch(uris[0], spec, policy)  # warm the client and its connection pool
            rows.append(measure("storage.fetch", uris, lambda u: storage.fetch(u, spec, policy).data, size))
            rows.append(measure("s3fs info+cat_file", uris, lambda u: (plain.info(u), plain.cat_file(u))[1], size))
    finally:
        server.terminate()
        server.wait(timeout=30)

    result = {
        "benchmark": "fetch_per_worker",
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_start": round(load_at_start, 2)},
        "endpoint": endpoint_note,
        "requests_per_object": {"storage.fetch": 1, "s3fs info+cat_file": 3},
        "results": rows,
    }
    print(f"\n== {result['benchmark']} ({endpoint_note}) ==")
    for r in rows:
        print(f"  {r['object_kib']:>6} KiB  {r['how']:<20} {r['mb_per_s']:>7} MB/s  {r['objects_per_s']:>7} obj/s  p50 {r['p50_ms']} ms")
    print(f"  load average at start: {result['machine']['load_avg_1m_at_start']} on {os.cpu_count()} CPUs")
    print(JSON_PREFIX + json.dumps(result, sort_keys=True), flush=True)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
