"""The web app: a Starlette application serving one static page (plain HTML/JS) and a small JSON API.

Why Starlette and not Gradio (this field's usual choice): installing Gradio into our environment would
downgrade Pillow (gradio 6 pins pillow<13) and pull pandas and ~20 other packages, and its file route has had
several path-traversal CVEs; here every file the browser can reach goes through one function
(``Workspace.resolve``) that the security tests exercise, pages have stable element ids for the browser test, and
the whole dependency is starlette + uvicorn + python-multipart.

Request rules (middleware): HTTP Basic auth when ``--auth`` is set; the Host header must name the bound
interface when it is loopback (DNS rebinding); every POST must carry ``X-Dev2pro-UI: 1`` (a header cross-site
forms cannot send, so another web page cannot start jobs through the user's browser); served HTML is sandboxed.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..outputs import write_json
from . import routes_data, routes_train
from .handlers import error, handler, number
from .jobs import JobManager
from .workspace import Workspace

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "train.js": "text/javascript", "jobs.js": "text/javascript",
                "runs.js": "text/javascript", "app.css": "text/css", "favicon.svg": "image/svg+xml"}
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class UIContext:
    """What every request handler needs: the workspace, the job queue and the limits."""

    ws: Workspace
    jobs: JobManager
    max_upload_bytes: int = 50 * 2**20
    max_files: int = 200
    settings_path: Path = field(init=False)

    def __post_init__(self):
        self.settings_path = self.ws.state / "settings.json"

    def settings(self) -> dict:
        try:
            return json.loads(self.settings_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def save_settings(self, values: dict) -> dict:
        merged = {**self.settings(), **values}
        write_json(self.settings_path, merged)
        return merged


class Guard(BaseHTTPMiddleware):
    def __init__(self, app, auth: str | None, hosts: set[str] | None):
        super().__init__(app)
        self.auth = auth
        self.hosts = hosts

    async def dispatch(self, request: Request, call_next):
        if self.hosts is not None and request.headers.get("host", "").rsplit(":", 1)[0] not in self.hosts:
            return PlainTextResponse("unexpected Host header", status_code=421)
        if self.auth is not None:
            given = request.headers.get("authorization", "")
            want = "Basic " + base64.b64encode(self.auth.encode()).decode()
            if not hmac.compare_digest(given.encode(), want.encode()):
                return PlainTextResponse("authentication required", status_code=401,
                                         headers={"WWW-Authenticate": 'Basic realm="dev2pro"'})
        if request.method not in ("GET", "HEAD") and request.headers.get("x-dev2pro-ui") != "1":
            return PlainTextResponse("missing X-Dev2pro-UI header", status_code=403)
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "SAMEORIGIN")
        return response


# ------------------------------------------------------------------------------------------------ static + files
async def index(request: Request):
    return FileResponse(STATIC / "index.html", media_type="text/html")


async def favicon(request: Request):
    """The tab icon (browsers ask for /favicon.ico on every page load whatever the page links)."""
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


async def static(request: Request):
    name = request.path_params["name"]
    if name not in STATIC_FILES:  # a fixed list: nothing else in the package is reachable
        return PlainTextResponse("not found", status_code=404)
    return FileResponse(STATIC / name, media_type=STATIC_FILES[name])


@handler
async def files(request: Request, ui: UIContext):
    """A workspace file (images, reports, LoRAs); ``?download=1`` as an attachment; HTML sandboxed."""
    path = ui.ws.resolve(request.path_params["path"], must_exist=True)
    if not path.is_file():
        return error("not a file", 404)
    headers = {"Content-Security-Policy": "sandbox; default-src 'none'; img-src data: 'self'; style-src "
                                          "'unsafe-inline'"}
    if request.query_params.get("download"):
        return FileResponse(path, filename=path.name, headers=headers)
    return FileResponse(path, headers=headers)


MAX_THUMB_PIXELS = 40_000_000  # decoded at most once per thumbnail (JPEGs at a reduced scale)


@handler
async def thumb(request: Request, ui: UIContext):
    """A small JPEG of a workspace image (the dataset grid loads dozens); images over ``MAX_THUMB_PIXELS`` are
    refused from their header, before any pixel is decoded (decompression bombs)."""
    path = ui.ws.resolve(request.query_params["path"], must_exist=True)
    size = number(request.query_params, "size", 192, 32, 512)

    def render() -> Response:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    w, h = im.size
                    # JPEGs decode at up to 1/8 scale (draft); PIL refuses any image over ~89 MP (warning -> error)
                    if w * h > MAX_THUMB_PIXELS and im.format != "JPEG":
                        return error(f"{ui.ws.rel(path)} is {w}x{h} px; thumbnails are made for images up to "
                                     f"{MAX_THUMB_PIXELS // 10**6} megapixels", 413)
                    im.draft("RGB", (size, size))  # JPEG: decode at 1/2..1/8 scale
                    im = ImageOps.exif_transpose(im).convert("RGB")
                    im.thumbnail((size, size))
                    buf = io.BytesIO()
                    im.save(buf, "JPEG", quality=85)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return error(f"{ui.ws.rel(path)} is too large to decode (a decompression bomb?)", 413)
        except Exception:  # noqa: BLE001 -- PIL raises many types for bad files; unreadable ones are flagged
            return error("not a readable image", 415)
        return Response(buf.getvalue(), media_type="image/jpeg")
    if not path.is_file():
        return error("not a file", 404)
    return await run_in_threadpool(render)


# ------------------------------------------------------------------------------------------------ jobs
@handler
async def jobs_list(request: Request, ui: UIContext):
    ui.jobs.schedule()
    return JSONResponse({"jobs": ui.jobs.list()})


@handler
async def job_detail(request: Request, ui: UIContext):
    job = ui.jobs.get(request.path_params["id"])
    if job is None:
        return error("no such job", 404)
    tail = ui.jobs.log_tail(job["id"], lines=number(request.query_params, "lines", 40, 1, 2000))
    lines = []
    if job["kind"] == "caption":  # `dev2pro caption --json`: one JSON object per image
        text = ui.jobs.log_tail(job["id"], lines=10_000, max_bytes=4_000_000)
        for line in text.replace("\r", "\n").splitlines():
            start = line.find('{"')  # stdout's JSON can follow stderr's progress bar on one line
            if start >= 0:
                try:
                    lines.append(json.loads(line[start:]))
                except json.JSONDecodeError:
                    pass
    outputs = []
    if job.get("out") and job["status"] == "done":
        out = ui.ws.resolve(job["out"])
        outputs = [ui.ws.rel(p) for p in sorted(out.glob("*"))[:500] if ui.ws.inside(p) and p.is_file()] \
            if out.is_dir() else []
    return JSONResponse({**job, "log": tail, "results": lines, "outputs": outputs})


@handler
async def job_stop(request: Request, ui: UIContext):
    if ui.jobs.get(request.path_params["id"]) is None:
        return error("no such job", 404)
    return JSONResponse(ui.jobs.stop(request.path_params["id"]))


def build_app(ui: UIContext, auth: str | None = None, hosts: set[str] | None = None) -> Starlette:
    """The ASGI app; ``hosts`` = accepted Host names (None: any, for non-loopback binds behind auth)."""
    routes = [
        Route("/", index),
        Route("/static/{name}", static),
        Route("/favicon.ico", favicon),
        Route("/files/{path:path}", files),
        Route("/api/thumb", thumb),
        Route("/api/jobs", jobs_list),
        Route("/api/jobs/{id}", job_detail),
        Route("/api/jobs/{id}/stop", job_stop, methods=["POST"]),
        *routes_data.routes(handler),
        *routes_train.routes(handler),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard, auth=auth, hosts=hosts)])
    app.state.ui = ui
    return app
