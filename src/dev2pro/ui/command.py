"""`dev2pro ui`: parse the flags, refuse unsafe binds, start the web app (imports the web stack lazily)."""

from __future__ import annotations

import ipaddress
import os
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


def serve(workspace: str, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
          max_upload_mb: int = 50):
    warning = check_bind(host, auth)
    # lazy: the server needs the optional `ui` extra (starlette, uvicorn) and loads torch (via outputs), and
    # `dev2pro ui --help` imports this module
    try:
        import uvicorn

        from .app import UIContext, build_app
        from .jobs import JobManager
        from .workspace import Workspace
    except ImportError as e:
        raise UserError(f"the web app needs its extra: pip install 'dev2pro[ui]' ({e.name} is missing)") from None

    ws_dir = Path(workspace)
    ws_dir.mkdir(parents=True, exist_ok=True)
    ws = Workspace(ws_dir)
    jobs = JobManager(ws.state, ws.root)
    ui = UIContext(ws, jobs, max_upload_bytes=max_upload_mb * 2**20)
    hosts = {host.strip("[]"), "127.0.0.1", "localhost", "::1", "[::1]"} if is_loopback(host) else None
    app = build_app(ui, auth=auth, hosts=hosts)
    if warning:
        print(warning, flush=True)
    running = [j for j in jobs.list() if j["status"] == "running"]
    print(f"dev2pro ui: workspace {ws.root}" + (f", re-attached to {len(running)} running job(s)" if running else ""))
    print(f"dev2pro ui: open http://{host if ':' not in host else f'[{host}]'}:{port}/", flush=True)
    jobs.start_scheduler()
    from . import planview, routes_train

    planview.warm_up(routes_train._schema)  # the form schema, GPU facts and the plan's imports, off the first click
    try:
        uvicorn.run(app, host=host.strip("[]"), port=port, log_level="warning")
    finally:
        jobs.close()  # running jobs keep running: they belong to their own sessions


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
