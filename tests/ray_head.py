"""A real Ray head for tests: `ray start --head --block` on loopback, every port explicit.

Why so careful: a head left behind breaks the next test ("No available agent to submit job")
because Ray's agent, client and metrics ports have fixed defaults, and other engineers' tests
run on the same machine. So every port is picked free at start, the head runs in a session of
its own (`start_new_session`), and `stop()` ends exactly that session: SIGTERM to `ray start`
(which shuts its children down), then SIGKILL to whatever of that session is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent


def kill_and_wait(processes: list[psutil.Process], timeout_s: float = 10.0) -> None:
    """SIGKILL exactly these processes (ones a test started, held by PID) and reap them."""
    for proc in processes:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=timeout_s)


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on loopback (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port_range(width: int, avoid: set[int] = frozenset()) -> int:
    """The first port of `width` consecutive ports that are free now (for worker ports) and
    clear of `avoid` (ports already picked for other components, closed again but promised)."""
    for _ in range(50):
        (start,) = free_ports(1)
        if start + width >= 65535 or avoid & set(range(start, start + width)):
            continue
        try:
            probes = []
            for port in range(start, start + width):
                sock = socket.socket()
                probes.append(sock)
                sock.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for sock in probes:
                sock.close()
    raise RuntimeError(f"found no {width} consecutive free ports")


def head_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the head and for clients: auth mode explicit, our venv first on PATH."""
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",  # a token in ~/.ray would otherwise switch the head to token auth
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    env.update(extra or {})
    return env


def short_temp_dir() -> Path:
    # Not under pytest's tmp_path: Ray puts Unix sockets in the session dir, and a path over
    # 107 bytes (pytest-xdist adds `popen-gwN/`) makes the dashboard's modules fail to start.
    return Path(tempfile.mkdtemp(prefix="tessera-ray-"))


class PortTaken(RuntimeError):
    """`ray start` found a port it was given already in use."""


@dataclass
class RayHead:
    temp_dir: Path = field(default_factory=short_temp_dir)
    num_cpus: int = 2
    env: dict[str, str] = field(default_factory=head_environment)
    process: subprocess.Popen | None = None
    dashboard_port: int = 0
    gcs_port: int = 0

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def start(self, timeout_s: float = 180.0, attempts: int = 3) -> "RayHead":
        """Start the head; a port taken between picking it and binding it (another test, or
        the OS handing it out again) makes `ray start` exit at once, so try fresh ports."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout_s)
            except PortTaken:
                if attempt == attempts:
                    raise

    def _start_once(self, timeout_s: float) -> "RayHead":
        (self.gcs_port, self.dashboard_port, agent_http, agent_grpc, client_port, metrics_port,
         runtime_env_port, node_manager, object_manager) = free_ports(9)
        workers = free_port_range(64, avoid={self.gcs_port, self.dashboard_port, agent_http, agent_grpc,
                                             client_port, metrics_port, runtime_env_port,
                                             node_manager, object_manager})
        # The session dir is a symlink under temp_dir; keep the path short (Unix sockets).
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(VENV_BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--ray-client-server-port={client_port}", f"--metrics-export-port={metrics_port}",
            f"--runtime-env-agent-port={runtime_env_port}", f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--min-worker-port={workers}", f"--max-worker-port={workers + 63}",
            f"--num-cpus={self.num_cpus}", "--num-gpus=0", "--include-dashboard=true",
            "--object-store-memory=200000000", "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
        ]
        self.log_path = self.temp_dir / "ray-start.log"
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            self._wait_for_job_api(timeout_s)
        except BaseException:
            # Fixtures call start() before their try: a head that failed to come up (or a
            # Ctrl-C while waiting) must not leave its raylet and GCS behind.
            self.stop()
            raise
        return self

    def _wait_for_job_api(self, timeout_s: float) -> None:
        """The head is ready when the Job Submission API answers and an agent can take jobs."""
        import requests

        deadline = time.monotonic() + timeout_s
        last_error = "not started"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_tail()
                if "is used by other components" in tail or "Address already in use" in tail:
                    raise PortTaken(tail)
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                response = requests.get(f"{self.dashboard_url}/api/jobs/", timeout=5)
                if response.status_code == 200:
                    return
                last_error = f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                last_error = str(exc)
            time.sleep(1)
        raise RuntimeError(f"the Ray head did not answer at {self.dashboard_url}: {last_error}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def our_processes(self) -> list[psutil.Process]:
        """Every live process this head started: its session, and descendants that left it
        (Ray runs each job's driver in a session of its own)."""
        if self.process is None:
            return []
        found = {}
        try:
            for proc in [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]:
                found[proc.pid] = proc
        except psutil.NoSuchProcess:
            pass
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.process.pid:
                    found[proc.pid] = proc
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return list(found.values())

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to `ray start --block` (it shuts its children down), then SIGKILL to whatever
        it started that is still there, remembered before the SIGTERM. (`ray start --block`
        often outlives the SIGTERM by far more than a few seconds: waiting longer only slows
        the suite, the SIGKILLs below end exactly the same processes.)"""
        if self.process is None:
            return
        started = self.our_processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        kill_and_wait([p for p in {p.pid: p for p in started + self.our_processes()}.values() if p.is_running()])
        if self.process.poll() is None:
            self.process.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
