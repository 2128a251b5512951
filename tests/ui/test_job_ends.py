"""How jobs end, as the page shows it: the log without terminal escape codes, each ended job's reason (the CLI's
error line, the state a stopped run saved, a cancel), any job kind stopped through /api/jobs/{id}/stop, a run
refused by the run-folder lock but finished by another process listed as finished; one `dev2pro ui` per workspace
(a second is refused naming the first), a busy port said in one line, a wildcard bind's address; a model path that
does not exist named at its field; the favicon."""

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("starlette")

from dev2pro.errors import UserError  # noqa: E402
from dev2pro.ui import uilock  # noqa: E402
from dev2pro.ui.command import open_address  # noqa: E402
from dev2pro.ui.jobs import JobManager, end_reason, strip_ansi  # noqa: E402

from .conftest import child_env, free_port  # noqa: E402

J = {"Content-Type": "application/json"}
# a stand-in `dev2pro convert` that draws a tqdm bar with escape codes, then refuses like the CLI does
FAILING = [sys.executable, "-c", "import sys; print('convert:  50%|#####     | 1/2 [00:01<00:01]\\x1b[A\\x1b[31m',"
           " flush=True); print('dev2pro convert: error: would delete x.png in datasets/dup; Nothing was deleted', "
           "file=sys.stderr); sys.exit(2)"]


def test_log_tail_strips_escape_codes_and_a_failed_job_says_why(tmp_path):
    m = JobManager(tmp_path / "state", tmp_path, command=FAILING)
    job = m.wait(m.submit("convert", [])["id"], timeout=60)
    assert job["status"] == "failed" and job["returncode"] == 2
    assert job["error"] == "would delete x.png in datasets/dup; Nothing was deleted"
    tail = m.log_tail(job["id"])
    assert "\x1b" not in tail and "[A" not in tail and "convert:  50%|#####     | 1/2 [00:01<00:01]" in tail
    # the reason is kept in the record: a restarted app shows it too
    assert JobManager(tmp_path / "state", tmp_path).get(job["id"])["error"] == job["error"]


def test_end_reasons():
    assert strip_ansi("a\x1b[A\x1b[2K\x1b[1;31mred\x1b[0m\x1b]0;title\x07b") == "aredb"
    stopped = ("step 27 loss 0.31\n 28%|###  | 28/100\ninterrupted at step 28: state saved in "
               "runs/a/state/step-000028; resume with: dev2pro train --resume runs/a\n")
    for status in ("stopped", "failed"):  # the run ended through Ctrl-C from a terminal, or Stop here
        assert end_reason(status, stopped, 130) == ("stopped: state saved at step 28 (runs/a/state/step-000028); "
                                                    "Resume continues from it")
    assert end_reason("stopped", "loading\n", 130) == "stopped on request"
    trace = "Traceback (most recent call last):\n  File \"x\", line 1\ntorch.OutOfMemoryError: CUDA out of memory\n" \
            "  3%|#    | 3/100 [00:03<01:40]\n"
    assert end_reason("failed", trace, 1) == "torch.OutOfMemoryError: CUDA out of memory"  # not the progress bar
    assert end_reason("failed", "", -9) == "failed with exit code -9"
    assert end_reason("done", "dev2pro train: error: old\n", 0) == ""


def test_any_job_kind_stops_from_the_page_and_refused_runs_stay_finished(web_app, asgi):
    app, ws, _, ui = web_app
    status, body = asgi(app, "POST", "/api/convert", json.dumps({"src": "models/flux", "dst": "models/fp8"}), J)
    job = json.loads(body)
    assert status == 200 and job["status"] == "queued"
    status, body = asgi(app, "POST", f"/api/jobs/{job['id']}/stop", "{}", J)
    assert status == 200 and json.loads(body)["status"] == "stopped"
    listed = json.loads(asgi(app, "GET", "/api/jobs")[1])["jobs"]
    assert [(j["kind"], j["status"], j["error"]) for j in listed] == [("convert", "stopped",
                                                                       "cancelled before it started")]
    # a training job refused by the run-folder lock (another process trained runs/r1 and finished it after)
    refused = ui.jobs.submit("train", ["train"], run_dir="runs/r1")
    ui.jobs.jobs[refused["id"]].update(status="failed", error="runs/r1 is in use: another dev2pro process")
    (ws / "runs" / "r1" / "summary.json").write_text("{}")
    runs = {r["run"]: r["status"] for r in json.loads(asgi(app, "GET", "/api/runs")[1])["runs"]}
    assert runs["runs/r1"] == "finished"
    assert json.loads(asgi(app, "GET", "/api/run?run=runs/r1")[1])["status"] == "finished"  # the Monitor agrees
    os.utime(ws / "runs" / "r1" / "summary.json", (time.time() - 3600,) * 2)  # an old run, and a job that failed now
    runs = {r["run"]: r["status"] for r in json.loads(asgi(app, "GET", "/api/runs")[1])["runs"]}
    assert runs["runs/r1"] == "failed" == json.loads(asgi(app, "GET", "/api/run?run=runs/r1")[1])["status"]


def test_a_missing_model_is_named_at_its_field_and_the_favicon_is_served(web_app, asgi):
    app = web_app[0]
    values = {"model.path": "models/nonexist", "data.folders": [{"path": "data"}], "save.output_dir": "runs/x"}
    status, body = asgi(app, "POST", "/api/train/plan", json.dumps({"values": values}), J)
    plan = json.loads(body)
    assert status == 200 and plan["field"] == "model.path" and not plan["ok"]
    assert plan["error"] == "'model.path': path 'models/nonexist' does not exist in the workspace"
    status, body = asgi(app, "GET", "/favicon.ico")
    assert status == 200 and body.startswith(b"<svg")
    assert asgi(app, "GET", "/static/favicon.svg")[0] == 200 and asgi(app, "GET", "/static/jobs.js")[0] == 200


def test_one_ui_per_workspace_and_one_line_for_a_busy_port(tmp_path, ui_server):
    held = uilock.hold(tmp_path / "ws" / ".dev2pro-ui", "http://127.0.0.1:1/")
    with pytest.raises(UserError, match=rf"another dev2pro ui \(PID {os.getpid()}\) is already serving the workspace "
                                        rf".* at http://127.0.0.1:1/: open that one"):
        uilock.hold(tmp_path / "ws" / ".dev2pro-ui", "http://127.0.0.1:2/")
    held.close()  # released (as by a crash: the kernel drops the lock with the process): taken again
    uilock.hold(tmp_path / "ws" / ".dev2pro-ui", "http://127.0.0.1:2/").close()

    ws = tmp_path / "ws"
    url = ui_server.start(ws)
    pid = ui_server.procs[-1].pid

    def second(*args):
        p = subprocess.run([sys.executable, "-m", "dev2pro.cli", "ui", *args], env=child_env(), capture_output=True,
                           text=True, timeout=120)
        return p.returncode, p.stdout + p.stderr

    rc, out = second("--workspace", str(ws), "--port", str(free_port()))
    assert rc == 2 and "open http" not in out
    assert f"another dev2pro ui (PID {pid}) is already serving the workspace {ws} at {url}/" in out, out
    rc, out = second("--workspace", str(tmp_path / "other"), "--port", url.rsplit(":", 1)[1])
    assert rc == 2 and "open http" not in out
    assert out.strip().splitlines() == [f"dev2pro ui: error: port {url.rsplit(':', 1)[1]} on 127.0.0.1 is already "
                                        f"in use (another dev2pro ui or another program); pass --port with a free port"]


def test_a_wildcard_bind_prints_an_address_to_open():
    import socket

    assert open_address("127.0.0.1", 7860) == ("http://127.0.0.1:7860/", "")
    assert open_address("::1", 7860) == ("http://[::1]:7860/", "")
    url, note = open_address("0.0.0.0", 7872)
    assert url == f"http://{socket.gethostname()}:7872/" and "0.0.0.0" not in url
    assert note == "listening on all interfaces (0.0.0.0:7872); on this machine: http://127.0.0.1:7872/"
