"""A real S3-protocol server on loopback for tests and benchmarks: moto's S3 behind werkzeug.

`S3Server` serves moto's apps on 127.0.0.1 on a free port and talks plain HTTP, so s3fs,
botocore and pyarrow run their real code paths. Beyond what `moto.server.ThreadedMotoServer`
gives, it can
- `stop()` for real (closes the listening socket *and* every open keep-alive connection, so
  clients see refused/reset connections, as with a crashed endpoint) and `start()` again on
  the same port; moto's state lives in this process, so buckets and objects survive;
- inject faults on the server side: answer the next N matching requests with an S3 error
  (`fail_next(503, "SlowDown")`), or hold matching requests for a while (`stall(...)`);
- count the requests it served (`requests`), so a test can tell whether a client retried.

No client-side mocking: everything a test checks goes over a socket.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from werkzeug.serving import ThreadedWSGIServer

# Distinctive dummy credentials: tests grep outputs for them to prove they never leak.
ACCESS_KEY_ID = "AKIATESSERATESTKEY01"
SECRET_ACCESS_KEY = "tessera-test-secret-DO-NOT-LEAK-9f3c1e"
REGION = "us-east-1"


def credentials_env() -> dict[str, str]:
    """Environment a client (or a Ray worker) needs to sign requests to the test server."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
        # Never let a developer's ~/.aws leak into a test (or a test into it).
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@dataclass
class _Rule:
    method: str | None
    path: re.Pattern
    remaining: int
    action: Callable[[dict, Callable], list[bytes]]


@dataclass
class RequestLog:
    """(method, path) of every request served, in order."""

    entries: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, path: str) -> None:
        with self.lock:
            self.entries.append((method, path))

    def count(self, method: str | None = None, path_contains: str = "") -> int:
        with self.lock:
            return sum(1 for m, p in self.entries if (method is None or m == method) and path_contains in p)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


class _Server(ThreadedWSGIServer):
    """Tracks accepted connections so that stop() can cut keep-alive ones too."""

    daemon_threads = True

    def __init__(self, *args, **kwargs):
        self.connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        with self._conn_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self._conn_lock:
            connections = list(self.connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class S3Server:
    """moto's S3 on http://127.0.0.1:<port>. Use as a context manager or start()/stop()."""

    def __init__(self, port: int = 0):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._moto_app = DomainDispatcherApplication(create_backend_app)
        self._handler = MotoRequestHandler
        self.port = port
        self.requests = RequestLog()
        self._rules: list[_Rule] = []
        self._rules_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> "S3Server":
        if self._server is not None:
            return self
        last_error: OSError | None = None
        for _ in range(50):  # the port may linger briefly after a stop
            try:
                server = _Server("127.0.0.1", self.port, self._app, handler=self._handler)
                break
            except OSError as exc:
                last_error = exc
                time.sleep(0.1)
        else:
            raise RuntimeError(f"cannot bind 127.0.0.1:{self.port}: {last_error}")
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name=f"s3server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: refuse new connections and cut the open ones. State is kept."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.cut_connections()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- clients ---------------------------------------------------------------------------

    def storage_options(self) -> dict:
        """fsspec/s3fs options for a client of this server (credentials from credentials_env())."""
        return {
            "key": ACCESS_KEY_ID,
            "secret": SECRET_ACCESS_KEY,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    def filesystem(self):
        """A fresh s3fs client (not cached) for setting up and reading back test data."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.storage_options())

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Keys in a bucket, read from moto's state in this process: works while stopped."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        found = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[bucket].keys
        return sorted(k for k in list(found.keys()) if k.startswith(prefix))

    # --- fault injection -------------------------------------------------------------------

    def fail_next(self, status: int, code: str, count: int = 1, path: str = ".*", method: str | None = None) -> None:
        """Answer the next `count` requests whose path matches `path` with an S3 error."""
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>injected by the test server</Message><RequestId>0</RequestId></Error>"
        ).encode()

        def action(environ, start_response):
            start_response(
                f"{status} {code}",
                [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
            )
            return [body]

        self._add_rule(_Rule(method, re.compile(path), count, action))

    def stall(self, seconds: float, count: int = 1, path: str = ".*", method: str | None = None) -> None:
        """Hold the next `count` matching requests for `seconds` before serving them."""

        def action(environ, start_response):
            time.sleep(seconds)
            return self._moto_app(environ, start_response)

        self._add_rule(_Rule(method, re.compile(path), count, action))

    def clear_faults(self) -> None:
        with self._rules_lock:
            self._rules.clear()

    def _add_rule(self, rule: _Rule) -> None:
        with self._rules_lock:
            self._rules.append(rule)

    def _app(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        self.requests.add(method, path)
        with self._rules_lock:
            rule = next(
                (r for r in self._rules if r.remaining > 0 and (r.method in (None, method)) and r.path.search(path)),
                None,
            )
            if rule is not None:
                rule.remaining -= 1
        if rule is not None:
            return rule.action(environ, start_response)
        return self._moto_app(environ, start_response)


def main(argv: list[str] | None = None) -> None:
    """`python tests/s3server.py [--port N]`: serve until interrupted (benchmarks, trying things)."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    args = parser.parse_args(argv)
    server = S3Server(port=args.port).start()
    print(f"S3 endpoint {server.endpoint_url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop()


if __name__ == "__main__":
    main()
