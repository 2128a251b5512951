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


CHROMIUM = "/usr/bin/chromium"
# a browser test module's marks: slow (the default run skips it), and skipped with its reason without chromium
BROWSER_TEST = [pytest.mark.slow, pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                                     reason="needs Debian's chromium (apt-get install chromium)")]
T = 120_000  # ms: generous waits for a loaded 2-core machine; each normally takes a few seconds


@pytest.fixture
def browser_page(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, accept_downloads=True,
            viewport={"width": 1280, "height": 900},
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.pages[0] if browser.pages else browser.new_page()
        page.set_default_timeout(T)
        yield page
        browser.close()


@pytest.fixture
def env():
    return child_env()


# ------------------------------------------------------------------------------------------------ in-process client
def asgi_request(app, method: str, url: str, body: bytes | str | list[bytes] = b"", headers: dict | None = None,
                 ui_header: bool = True) -> tuple[int, bytes]:
    """One request straight into the ASGI ``app`` (no socket, no thread): (status, body). ``body`` as a list is
    sent in chunks without a Content-Length (a chunked upload)."""
    import asyncio
    from urllib.parse import unquote

    path, _, query = url.partition("?")
    body = body.encode() if isinstance(body, str) else body
    chunks = body if isinstance(body, list) else [body]
    hdrs = {"host": "127.0.0.1", **({"x-dev2pro-ui": "1"} if ui_header else {}),
            **{k.lower(): v for k, v in (headers or {}).items()}}
    if not isinstance(body, list):
        hdrs.setdefault("content-length", str(len(body)))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": unquote(path), "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "headers": [(k.encode(), str(v).encode("latin-1")) for k, v in hdrs.items()],
             "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80)}
    sent = {"status": None, "body": b""}
    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def run():
        done = asyncio.Event()

        async def receive():
            if queue:
                return queue.pop(0)
            await done.wait()  # the client stays connected until the whole response has arrived
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    done.set()
        await app(scope, receive, send)

    asyncio.run(run())
    return sent["status"], sent["body"]


@pytest.fixture
def asgi():
    return asgi_request


# ------------------------------------------------------------------------------------------------ hostile workspace
CANARY = "CANARY-3b1f-do-not-read"  # the file outside the workspace no response may ever contain
RUN_TOML = """[model]\npath = "{ws}/models/flux"\n[sample]\nprompts = ["a cat"]\nseeds = [1]\nsteps = 2
width = 64\nheight = 64\nguidance = 3.5\n[train]\nsteps = 10\n"""


def queue_only_jobs(state, root):
    """A JobManager whose jobs are recorded and queued but never started (the tests look at what would run)."""
    from dev2pro.ui.jobs import JobManager

    class QueueOnly(JobManager):
        def _start(self, job):
            pass
    return QueueOnly(state, root)


def png(size=(32, 24)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


def make_workspace(tmp_path):
    """A workspace with a dataset (data/), a model folder, a finished run, and symlinks to a canary outside it
    (mixed/: a dataset folder with a caption and an image that lead out; models/linked, escape)."""
    ws, out = tmp_path / "ws", tmp_path / "outside"
    for d in ("data", "models/flux/transformer", "runs/r1", "runs/a", "runs/b"):
        (ws / d).mkdir(parents=True)
    out.mkdir()
    (out / "canary.txt").write_text(CANARY)
    (out / "model").mkdir()
    (out / "model" / "model_index.json").write_text("{}")
    (out / "pic.png").write_bytes(png())
    (ws / "data" / "a.png").write_bytes(png())
    (ws / "data" / "a.txt").write_text("a blue square\n")
    (ws / "data" / "b.png").write_bytes(png((40, 40)))
    (ws / "mixed").mkdir()  # a dataset folder with symlinks out
    (ws / "mixed" / "a.png").write_bytes(png())
    (ws / "mixed" / "a.txt").write_text("a blue square\n")
    (ws / "mixed" / "b.png").write_bytes(png((40, 40)))
    os.symlink(out / "canary.txt", ws / "mixed" / "b.txt")  # b's caption: a symlink out
    os.symlink(out / "pic.png", ws / "mixed" / "c.png")  # an image: a symlink out
    (ws / "models" / "flux" / "model_index.json").write_text("{}")
    os.symlink(out / "model", ws / "models" / "linked")  # a model folder: a symlink out
    os.symlink(ws / "models" / "flux", ws / "models" / "alias")  # a symlink that stays inside
    os.symlink(out, ws / "escape")
    (ws / "runs" / "r1" / "config.toml").write_text(RUN_TOML.format(ws=ws.resolve()))
    (ws / "runs" / "r1" / "lora.safetensors").write_bytes(b"\0" * 16)
    (ws / "runs" / "r1" / "logs").mkdir()
    (ws / "loose.safetensors").write_bytes(b"\0" * 16)  # a LoRA outside any run folder
    return ws.resolve(), out


@pytest.fixture
def web_app(tmp_path):
    """(ASGI app, workspace, outside folder with the canary, UIContext) over ``make_workspace``; jobs only queue."""
    from dev2pro.ui.app import UIContext, build_app
    from dev2pro.ui.workspace import Workspace

    ws_dir, out = make_workspace(tmp_path)
    ws = Workspace(ws_dir)
    ui = UIContext(ws, queue_only_jobs(ws.state, ws.root), max_upload_bytes=20_000, max_files=4)
    return build_app(ui, hosts={"127.0.0.1"}), ws_dir, out, ui
