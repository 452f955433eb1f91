"""A real ``mlflow server`` on loopback for the tests that need a tracking server (HTTP REST API,
proxied artifacts, the model registry behind a server).

The server keeps its runs in a SQLite file and its artifacts in a folder, both under the given root,
and serves the artifacts itself (``--serve-artifacts``), so clients upload and download through
HTTP exactly as against a team server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: seconds to wait for ``/health``; a cold start takes ~10 s on 2 busy cores
START_TIMEOUT = 90.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    # the server forks a uvicorn worker: signal the whole process group it leads (its own session,
    # so nothing else is in it), politely first, then for good
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        proc.poll()  # reaps the leader once it exits, so a zombie does not count as alive
        time.sleep(0.2)
    if _group_alive(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class ServerProcess:
    """A started ``mlflow server``: its URL and a way to make it die abruptly."""

    url: str
    proc: subprocess.Popen
    #: the backend store the server writes (a SQLite file), to check what reached it after it died
    store_uri: str

    def kill(self) -> None:
        """SIGKILL the server's whole process group (a crash, not a shutdown) and reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 15
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            self.proc.poll()
            time.sleep(0.1)


@contextmanager
def running_mlflow_server(root: Path, timeout: float = START_TIMEOUT) -> Iterator[str]:
    """Start ``mlflow server`` on 127.0.0.1, yield its URL, always stop it.

    Args:
        root: folder for the backend store (``server.db``), the artifacts (``artifacts/``) and
            the server log (``server.log``).
        timeout: seconds to wait for ``GET /health``.

    Yields:
        The tracking URI, ``http://127.0.0.1:<port>``.

    Raises:
        RuntimeError: the server exited or was not healthy within ``timeout``; the message holds
            the tail of its log.
    """
    with mlflow_server_process(root, timeout) as server:
        yield server.url


@contextmanager
def mlflow_server_process(root: Path, timeout: float = START_TIMEOUT) -> Iterator[ServerProcess]:
    """Like :func:`running_mlflow_server`, but yields the process too, so a test can kill it.

    Args:
        root: folder for the backend store, the artifacts and the server log.
        timeout: seconds to wait for ``GET /health``.

    Yields:
        The running server.

    Raises:
        RuntimeError: the server exited or was not healthy within ``timeout``.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--serve-artifacts",
        "--artifacts-destination", str(root / "artifacts"),
        # the security middleware checks the Host header; name the loopback host explicitly
        # rather than rely on the defaults covering it
        "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # no background job runner (it forks several consumers): the tests need none and have 2 cores
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env["OMP_NUM_THREADS"] = "1"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with {proc.returncode}"
                    if proc.poll() is not None
                    else f"not healthy in {timeout}s"
                )
                raise RuntimeError(f"mlflow server {why}:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.5)
        yield ServerProcess(url, proc, f"sqlite:///{root / 'server.db'}")
    finally:
        _stop(proc)
