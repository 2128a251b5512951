"""Fixtures for the web-app tests: a running `dev2pro ui` server on a free port over a fresh workspace."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    """The test's source tree first on the path, one torch thread per job (the CI box has two cores)."""
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def start_server(workspace: Path, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "dev2pro.cli", "ui", "--workspace", str(workspace), "--port",
                             str(port), *extra], env=env or child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("dev2pro ui exited: " + proc.stdout.read())
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("dev2pro ui did not start within 60 s")


def stop_server(proc: subprocess.Popen):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


class Servers:
    """`dev2pro ui` subprocesses of one test: start, crash (SIGKILL, as a crash would), stop all at the end."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, workspace: Path, *extra: str, port: int | None = None) -> str:
        port = port or free_port()
        self.procs.append(start_server(workspace, port, *extra))
        return f"http://127.0.0.1:{port}"

    def crash(self):
        self.procs[-1].kill()
        self.procs[-1].wait(timeout=10)


@pytest.fixture
def ui_server():
    servers = Servers()
    yield servers
    for p in servers.procs:
        if p.poll() is None:
            stop_server(p)


@pytest.fixture
def env():
    return child_env()
