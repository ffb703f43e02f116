"""The web UI's folder: paths stay inside it; jobs start, report and stop; the command refuses what it cannot do."""

import socket
import sys
import time

import pytest

from tuneforge.cli import main
from tuneforge.errors import ConfigError
from tuneforge.webui.jobs import Jobs
from tuneforge.webui.workspace import Workspace


def test_paths_typed_in_the_page_stay_inside_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").mkdir()
    (root / "link").symlink_to(tmp_path / "secret")
    ws = Workspace(root)
    assert ws.path("data") == root / "data" and ws.path(str(root / "runs")) == root / "runs"
    for outside in ("../secret", str(tmp_path / "secret"), "link", "runs/../../secret", "~"):
        with pytest.raises(ConfigError, match="is outside the web UI's folder"):
            ws.path(outside)


def test_a_job_runs_in_its_own_process_reports_progress_and_stops_with_ctrl_c(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    jobs = Jobs(root)
    script = root / "fake.py"  # stands in for `tuneforge train`: prints a progress bar until Ctrl-C
    script.write_text("import sys, time\nfor i in range(1, 600):\n    print(f'\\r{i}/600 [00:0{i % 10}<09:59, 1s/it]', "
                      "end='', flush=True)\n    time.sleep(0.05)\n")
    import tuneforge.webui.jobs as jobs_module

    real = jobs_module.subprocess.Popen
    monkeypatch.setattr(jobs_module.subprocess, "Popen", lambda cmd, **kw: real([sys.executable, str(script)], **kw))
    job = jobs.start(root / "cfg.yaml", root / "runs" / "demo")
    time.sleep(1.5)
    status = jobs.status()
    assert status.running and status.run_dir.endswith("demo") and status.total == 600 and status.step >= 1
    assert Jobs(root).status().running  # a second page (or a restarted UI) sees the same job
    with pytest.raises(ConfigError, match="a training job is already running"):
        jobs.start(root / "cfg.yaml", root / "runs" / "other")
    with pytest.raises(ConfigError, match="being trained by the running job"):
        jobs.start(root / "cfg.yaml", root / "runs" / "demo", alongside=True)
    second = jobs.start(root / "cfg.yaml", root / "runs" / "other", alongside=True)  # the user confirmed
    assert len(jobs.running()) == 2 and jobs.status().run_dir.endswith("other")  # the page follows the newest
    assert jobs.stop()  # stops the newest first
    for _ in range(100):
        if len(jobs.running()) == 1:
            break
        time.sleep(0.1)
    assert [j["pid"] for j in jobs.running()] == [job["pid"]] and second["pid"] != job["pid"]
    assert jobs.stop()
    for _ in range(100):
        if not jobs.running():
            break
        time.sleep(0.1)
    assert not jobs.running() and not jobs.status().running and job["pid"] > 0


def test_the_web_ui_refuses_a_port_in_use_and_a_bad_auth(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["webui", "--root", str(tmp_path), "--port", str(port)]) == 2
    assert f"--port {port}: something is already listening" in capsys.readouterr().err
    assert main(["webui", "--root", str(tmp_path), "--port", "1", "--auth", "nopassword"]) == 2
    assert main(["webui", "--root", str(tmp_path / "nope")]) == 2
    assert "--root" in capsys.readouterr().err
