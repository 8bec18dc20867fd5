"""Crash and hang isolation for native decoders (libjpeg, libav, pdfium, ...).

A file that makes a native decoder crash or hang takes the whole process with it, which no
`try` catches; in a Ray worker that fails the whole block, and Ray retries the same block
into the same crash. So decoding runs in a child process, one per CPU worker, kept for the
worker's life: the worker sends (function, arguments), the child sends back the result or an
`ItemError`. If the child dies, that item alone becomes `decode.crashed`; if it does not
answer within the item's time limit, it is killed and the item becomes `decode.timeout`.
Either way the next item gets a fresh child.

The channel is the child's stdin/stdout pipes with length-prefixed pickles. We start the
child with `subprocess` and `python -m pipeline.isolation`, not `multiprocessing`: spawn
would re-import the Ray worker's `__main__`, and fork is unsafe in a process with threads.
The child imports only the decoders (no torch, no transformers), so it starts in a fraction
of a second and costs little memory.

What it costs per item: one pickle each way and two pipe copies (the item's bytes in, the
uint8 tiles out); see benchmarks/media_bench.py.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from schemas.errors import ErrorCode, ItemError

_HEADER = struct.Struct("<Q")
_READY = b"R"
# The child may take a while to import its decoders on a busy machine; that is not the item's fault.
STARTUP_TIMEOUT_S = 60.0
# How often an idle child checks that its parent is still alive.
_ORPHAN_CHECK_S = 1.0


class IsolatedCaller:
    """Runs picklable, module-level functions in a long-lived child process."""

    def __init__(self, env: dict[str, str] | None = None):
        self._env = env
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.started = 0  # children started so far (the first, and one after each crash/hang)

    def call(self, fn: Callable, *args: Any, timeout_s: float, what: str = "the item") -> Any:
        """fn(*args) in the child. Raises the function's ItemError, or ItemError
        decode.crashed / decode.timeout naming `what`."""
        with self._lock:
            child = self._ensure_child()
            request = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
            try:
                _write_message(child.stdin.fileno(), request)
                reply = _read_message(child.stdout.fileno(), time.monotonic() + timeout_s)
            except TimeoutError:
                self._kill()
                raise ItemError(
                    ErrorCode.DECODE_TIMEOUT, f"decoding {what} took longer than media.decode_timeout_s = {timeout_s:g} s"
                ) from None
            except (EOFError, BrokenPipeError, ConnectionError, OSError):
                status = self._reap()
                raise ItemError(ErrorCode.DECODE_CRASHED, f"the decoder crashed on {what} ({status})") from None
        status, value = pickle.loads(reply)
        if status == "ok":
            return value
        raise value

    def close(self) -> None:
        with self._lock:
            self._kill()

    def __del__(self):  # a worker dropping its caller must not leave a child behind
        try:
            self._kill()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _ensure_child(self) -> subprocess.Popen:
        if self._child is not None and self._child.poll() is None:
            return self._child
        self._child = None
        env = dict(os.environ if self._env is None else self._env)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        child = subprocess.Popen(
            [sys.executable, "-m", "pipeline.isolation", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self.started += 1
        try:
            if _read_exact(child.stdout.fileno(), 1, time.monotonic() + STARTUP_TIMEOUT_S) != _READY:
                raise EOFError("bad handshake")
        except (TimeoutError, EOFError, OSError) as exc:
            child.kill()
            child.wait()
            raise ItemError(ErrorCode.DECODE_CRASHED, f"the decoder process did not start ({type(exc).__name__})") from None
        self._child = child
        return child

    def _kill(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        if child.poll() is None:
            child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def _reap(self) -> str:
        """Why the child died, in words ("killed by SIGABRT", "exited with status 1")."""
        child = self._child
        if child is None:
            return "no decoder process"
        try:
            code = child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._kill()
        if code is None:
            return "it stopped answering"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"


def _write_message(fd: int, payload: bytes) -> None:
    view = memoryview(_HEADER.pack(len(payload)) + payload)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_message(fd: int, deadline: float) -> bytes:
    (length,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return _read_exact(fd, length, deadline)


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, remaining = [], n
    while remaining:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the worker that started us is gone (it may die while we are busy)."""
    while True:
        time.sleep(_ORPHAN_CHECK_S)
        if os.getppid() != parent_pid:
            os._exit(0)


def child_main(parent_pid: int) -> None:
    # The protocol owns stdout; anything a library prints goes to stderr instead.
    requests, replies = sys.stdin.fileno(), os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import pipeline.decode  # noqa: F401 - pay for the decoders' imports before saying ready

    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    os.write(replies, _READY)
    while True:
        try:
            request = _read_message(requests, None)
        except EOFError:
            return  # the worker closed the pipe: we are done
        fn, args = pickle.loads(request)
        try:
            reply = ("ok", fn(*args))
        except ItemError as exc:
            reply = ("error", exc)
        except Exception as exc:  # noqa: BLE001 - a bug in fn must not kill the child
            reply = ("error", ItemError(ErrorCode.DECODE_CORRUPT, f"unexpected {type(exc).__name__}: {exc}"))
        _write_message(replies, pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


if __name__ == "__main__":
    child_main(int(sys.argv[1]))
