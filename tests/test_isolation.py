"""A decoder that really crashes (os.abort(), a segfault) or hangs becomes one error row —
decode.crashed / decode.timeout — while its neighbours succeed: unit tests of the isolated
child process, and one run of the real pipeline on a local Ray cluster.

The crashes and the hang come from the test-only hook in pipeline/decode.py, which is inert
unless TESSERA_TEST_HOOKS=1 is in the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pyarrow.parquet as pq
import pytest

from jobs.sample import encode_image, synthetic_image
from pipeline import decode
from pipeline.decode import TEST_HOOK_PREFIX, TEST_HOOKS_ENV, Shaping
from pipeline.isolation import IsolatedCaller
from schemas.errors import ErrorCode, ItemError
from schemas.spec import MediaSpec

SHAPING = Shaping(frame_size=(56, 56))
GOOD = encode_image(synthetic_image(320, 240, seed=1), "jpeg")
ABORT, SEGFAULT, HANG = (TEST_HOOK_PREFIX + action for action in (b"abort", b"segfault", b"hang"))


@pytest.fixture
def caller(monkeypatch):
    monkeypatch.setenv(TEST_HOOKS_ENV, "1")  # the child copies the environment when it starts
    caller = IsolatedCaller()
    yield caller
    caller.close()


def run(caller: IsolatedCaller, data: bytes, timeout_s: float = 30.0):
    return caller.call(decode.prepare_media, data, None, MediaSpec(), SHAPING, timeout_s=timeout_s, what="item-x")


def error_of(fn, *args, **kwargs) -> ItemError:
    with pytest.raises(ItemError) as caught:
        fn(*args, **kwargs)
    return caught.value


def test_results_and_item_errors_come_back_from_the_child(caller):
    media = run(caller, GOOD)
    assert media.kind == "image" and media.images[0].size == (320, 240)
    assert error_of(run, caller, GOOD[:100]).code == ErrorCode.DECODE_CORRUPT
    assert caller.started == 1  # one child served all of it


@pytest.mark.parametrize("poison,signal_name", [(ABORT, "SIGABRT"), (SEGFAULT, "SIGSEGV")])
def test_a_crash_is_one_error_and_the_next_item_gets_a_fresh_child(caller, poison, signal_name):
    assert run(caller, GOOD).kind == "image"
    error = error_of(run, caller, poison)
    assert error.code == ErrorCode.DECODE_CRASHED
    assert signal_name in error.message and "item-x" in error.message
    assert run(caller, GOOD).kind == "image"
    assert caller.started == 2


def test_a_hang_is_killed_at_the_time_limit(caller):
    started = time.monotonic()
    error = error_of(run, caller, HANG, timeout_s=1.0)
    assert error.code == ErrorCode.DECODE_TIMEOUT and "decode_timeout_s" in error.message
    assert time.monotonic() - started < 30  # killed, not waited for
    assert run(caller, GOOD).kind == "image"


def test_hooks_are_inert_without_the_environment_variable(monkeypatch):
    monkeypatch.delenv(TEST_HOOKS_ENV, raising=False)
    caller = IsolatedCaller()
    try:
        for poison in (ABORT, SEGFAULT, HANG):
            assert error_of(run, caller, poison, timeout_s=10).code == ErrorCode.DECODE_UNSUPPORTED
        assert caller.started == 1
    finally:
        caller.close()
    assert error_of(decode.prepare_media, ABORT, None, MediaSpec(), SHAPING).code == ErrorCode.DECODE_UNSUPPORTED


def test_closing_the_caller_ends_its_child(caller):
    run(caller, GOOD)
    pid = caller._child.pid
    caller.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_child_does_not_outlive_its_worker():
    """The worker dies without closing anything (as a killed Ray worker would): its child,
    even one stuck in a hang, goes too."""
    script = textwrap.dedent(
        f"""
        import os, sys, threading
        os.environ[{TEST_HOOKS_ENV!r}] = "1"
        from pipeline import decode
        from pipeline.decode import Shaping
        from pipeline.isolation import IsolatedCaller
        from schemas.spec import MediaSpec
        caller = IsolatedCaller()
        caller._ensure_child()
        print(caller._child.pid, flush=True)
        threading.Timer(1.0, lambda: os._exit(0)).start()
        caller.call(decode.prepare_media, {HANG!r}, None, MediaSpec(), Shaping((56, 56)), timeout_s=600)
        """
    )
    worker = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    child = int(worker.stdout.split()[0])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.2)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


# --- through the real pipeline ---------------------------------------------------------------


@pytest.mark.slow
def test_poison_items_are_error_rows_and_their_neighbours_succeed(tmp_path, make_spec, tiny_model_path, ray_local):
    from pipeline.run import run_job

    media = tmp_path / "media"
    media.mkdir()
    rows = []
    for index in range(6):
        (media / f"good-{index}.jpg").write_bytes(encode_image(synthetic_image(320 + 40 * index, 240, seed=index), "jpeg"))
        rows.append({"id": f"good-{index}", "uri": f"media/good-{index}.jpg"})
    for name, data in (("abort", ABORT), ("segfault", SEGFAULT), ("hang", HANG)):
        (media / f"{name}.jpg").write_bytes(data)
        rows.insert(2 * len(rows) // 3, {"id": name, "uri": f"media/{name}.jpg"})  # in the middle of good rows
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = make_spec(
        manifest,
        media={"decode_timeout_s": 5, "isolation": "process"},
        task={"prompt": "Describe the image in a few words.", "sampling": {"max_new_tokens": 4}},
        ray={"num_cpus": 2},
    )

    summary = run_job(spec)  # on the shared cluster: its workers have the test hooks on

    table = pq.read_table(summary["output"]["run_dir"]).to_pylist()
    by_id = {row["id"]: row for row in table}
    assert sorted(by_id) == sorted(row["id"] for row in rows) and len(table) == len(rows)
    assert by_id["abort"]["error_code"] == "decode.crashed" and "SIGABRT" in by_id["abort"]["error_message"]
    assert by_id["segfault"]["error_code"] == "decode.crashed" and "SIGSEGV" in by_id["segfault"]["error_message"]
    assert by_id["hang"]["error_code"] == "decode.timeout"
    assert "hang.jpg" in by_id["hang"]["error_message"]
    for index in range(6):
        assert by_id[f"good-{index}"]["status"] == "ok", by_id[f"good-{index}"]
    assert summary["invariant"]["ok"] and summary["rows_in"] == summary["rows_out"] == len(rows)
