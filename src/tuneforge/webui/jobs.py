"""Training jobs of the web UI: `tuneforge train CONFIG` as a separate process, so that the page stays responsive,
and a browser reload, a second tab or a restarted UI re-attach to it (its id, config and log path are kept in
`<root>/.tuneforge/jobs/*.json`). One job at a time per root unless the user asks for a second one alongside;
the page follows the newest job; Stop sends Ctrl-C to it (a checkpoint is saved)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import ConfigError
from tuneforge.rundir import process_alive

PROGRESS = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")  # tqdm: "12/50 [00:30<01:35"


@dataclass
class JobStatus:
    running: bool
    run_dir: str | None = None
    config: str | None = None
    log: str | None = None
    step: int | None = None
    total: int | None = None
    elapsed: str | None = None
    remaining: str | None = None
    returncode: int | None = None


class Jobs:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.folder = self.root / ".tuneforge"
        self.folder.mkdir(exist_ok=True)
        self.records = self.folder / "jobs"
        self.records.mkdir(exist_ok=True)
        self._processes: dict[int, subprocess.Popen] = {}  # started by this UI: reaped by status(), no zombies

    def _all(self) -> list[dict]:
        jobs = []
        for path in self.records.glob("*.json"):
            try:
                jobs.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
        return sorted(jobs, key=lambda job: job.get("started", 0))

    def _read(self) -> dict:
        """The job the page follows: the newest one."""
        jobs = self._all()
        return jobs[-1] if jobs else {}

    def _alive(self, job: dict) -> bool:
        process = self._processes.get(job.get("pid"))
        if process is not None and process.poll() is not None:
            return False
        return process_alive(job.get("pid"))

    def running(self) -> list[dict]:
        return [job for job in self._all() if self._alive(job)]

    def start(self, config: Path, run_dir: Path, overrides: list[str] = (), alongside: bool = False) -> dict:
        busy = self.running()
        if busy and not alongside:
            raise ConfigError(f"a training job is already running ({busy[-1].get('run_dir')}); wait for it, stop it, "
                              "or tick 'run alongside' to start a second one (both then share this machine)")
        if any(Path(job.get("run_dir", "")).resolve() == Path(run_dir).resolve() for job in busy):
            raise ConfigError(f"{run_dir} is being trained by the running job; pick another run name")
        log = self.folder / "logs" / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", str(config), *overrides],
                                       cwd=self.root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        job = {"pid": process.pid, "run_dir": str(run_dir), "config": str(config), "log": str(log),
               "started": time.time()}
        record = self.records / f"{time.strftime('%Y%m%d-%H%M%S')}-{process.pid}.json"
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(job), encoding="utf-8")
        tmp.replace(record)
        self._processes[process.pid] = process
        return job

    def status(self) -> JobStatus:
        job = self._read()
        if not job:
            return JobStatus(False)
        process = self._processes.get(job.get("pid"))
        returncode = process.poll() if process is not None else None
        for other in list(self._processes.values()):
            other.poll()
        running = returncode is None and process_alive(job.get("pid"))
        status = JobStatus(running, job.get("run_dir"), job.get("config"), job.get("log"), returncode=returncode)
        tail = self.log_tail(4000)
        found = PROGRESS.findall(tail)
        if found:
            step, total, elapsed, remaining = found[-1]
            status.step, status.total, status.elapsed, status.remaining = int(step), int(total), elapsed, remaining
        return status

    def log_tail(self, chars: int = 6000, lines: int = 14) -> str:
        job = self._read()
        log = Path(job["log"]) if job.get("log") else None
        if log is None or not log.is_file():
            return ""
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - chars))
            text = f.read().decode("utf-8", errors="replace")
        # progress bars rewrite their line with \r: show the latest state of each line
        return "\n".join([line.split("\r")[-1] for line in text.split("\n")][-lines:])

    def stop(self) -> bool:
        """Ctrl-C for the newest running job: it finishes its step, saves a checkpoint and ends as interrupted."""
        busy = self.running()
        if not busy:
            return False
        job = busy[-1]
        os.kill(job["pid"], signal.SIGINT)
        return True
