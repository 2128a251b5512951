"""`dev2pro ui`: parse the flags, refuse unsafe binds, start the web app (imports the web stack lazily)."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from pathlib import Path

from ..errors import UserError


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, auth: str | None) -> str | None:
    """None for a safe loopback bind; a warning for a non-loopback bind with auth; UserError without auth."""
    if auth is not None and (":" not in auth or not auth.split(":", 1)[0] or not auth.split(":", 1)[1]):
        raise UserError("--auth must be USER:PASS with both parts non-empty")
    if is_loopback(host):
        return None
    if auth is None:
        raise UserError(f"--host {host} exposes the web app (and every file in the workspace) to the network; pass "
                        f"--auth USER:PASS to require a login, or bind 127.0.0.1 (the default)")
    return (f"warning: dev2pro ui is listening on {host}: anyone who can reach this address and knows the password "
            f"can read the workspace and run jobs; traffic is plain HTTP (use an SSH tunnel or a TLS proxy)")


def open_address(host: str, port: int) -> tuple[str, str]:
    """(the address to open, a note on the bind): a wildcard bind (0.0.0.0, ::) is not an address a browser can
    open, so this machine's name is given, with 127.0.0.1 for a browser on the machine itself."""
    bare = host.strip("[]")
    if bare in ("0.0.0.0", "::", ""):
        return (f"http://{socket.gethostname()}:{port}/",
                f"listening on all interfaces ({host or '*'}:{port}); on this machine: http://127.0.0.1:{port}/")
    return f"http://{f'[{bare}]' if ':' in bare else bare}:{port}/", ""


def check_port(host: str, port: int):
    """UserError when ``port`` cannot be bound on ``host`` (in use, or not allowed); the server binds it again
    right after (with the same SO_REUSEADDR rule as uvicorn)."""
    bare = host.strip("[]")
    try:
        family = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((bare, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use (another dev2pro ui or another program); "
                            f"pass --port with a free port") from None
        raise UserError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None


def serve(workspace: str, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
          max_upload_mb: int = 50):
    warning = check_bind(host, auth)
    # lazy: the server needs the optional `ui` extra (starlette, uvicorn) and loads torch (via outputs), and
    # `dev2pro ui --help` imports this module
    try:
        import uvicorn

        from . import uilock
        from .app import UIContext, build_app
        from .jobs import JobManager
        from .workspace import Workspace
    except ImportError as e:
        raise UserError(f"the web app needs its extra: pip install 'dev2pro[ui]' ({e.name} is missing)") from None

    ws_dir = Path(workspace)
    ws_dir.mkdir(parents=True, exist_ok=True)
    ws = Workspace(ws_dir)
    url, note = open_address(host, port)
    lock = uilock.hold(ws.state, url)  # held (open) for the life of the server: one app per workspace
    check_port(host, port)  # one clear line for a busy port, before anything says "open"
    jobs = JobManager(ws.state, ws.root)
    ui = UIContext(ws, jobs, max_upload_bytes=max_upload_mb * 2**20)
    hosts = {host.strip("[]"), "127.0.0.1", "localhost", "::1", "[::1]"} if is_loopback(host) else None
    app = build_app(ui, auth=auth, hosts=hosts)
    if warning:
        print(warning, flush=True)
    running = [j for j in jobs.list() if j["status"] == "running"]
    print(f"dev2pro ui: workspace {ws.root}" + (f", re-attached to {len(running)} running job(s)" if running else ""))
    print(f"dev2pro ui: open {url}" + (f" ({note})" if note else ""), flush=True)
    jobs.start_scheduler()
    from . import planview, routes_train

    planview.warm_up(routes_train._schema)  # the form schema, GPU facts and the plan's imports, off the first click
    try:
        uvicorn.run(app, host=host.strip("[]"), port=port, log_level="warning")
    finally:
        jobs.close()  # running jobs keep running: they belong to their own sessions
        lock.close()


def add_ui_parser(sub):
    p = sub.add_parser("ui", help="local web app: models, dataset + auto-captions, training, monitor, results")
    p.add_argument("--workspace", default=os.environ.get("DEV2PRO_WORKSPACE", "."), metavar="DIR",
                   help="the only folder the app reads and writes (default: the current folder)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (non-loopback needs --auth)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--auth", metavar="USER:PASS", default=os.environ.get("DEV2PRO_UI_AUTH"),
                   help="require HTTP basic auth (also read from DEV2PRO_UI_AUTH, which keeps it out of `ps`)")
    p.add_argument("--max-upload-mb", type=int, default=50, help="largest accepted image upload")

    def run(a):
        serve(a.workspace, a.host, a.port, a.auth, a.max_upload_mb)
    p.set_defaults(run=run)
    return p
