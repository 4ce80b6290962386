"""The web UI's job queue: long jobs (training, composition, ProFusion) run here, one at a time, not in a request.

A job is a list of conceptkit CLI commands run as subprocesses, in order. That keeps the server responsive and
every result reproducible: the page shows the exact commands, and a cancelled or failed job leaves its
checkpoints for `--resume`. Each job lives in its own folder (job.json, progress.jsonl, stderr.log, out/), so the
queue survives page reloads and is shared by every browser tab and user; a server restart re-queues the jobs that
had not started and marks the interrupted one as failed (its checkpoints stay).
"""
from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import locks
from ..files import atomic_write_text

FINISHED = ("done", "failed", "cancelled")


@dataclass
class Job:
    id: str
    kind: str  # ti, lora, promptnet, compose, profusion
    title: str
    commands: list[list[str]]  # conceptkit arguments, without the program name
    folder: str
    status: str = "queued"  # queued, running, done, failed, cancelled
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None  # one line, for the page
    command_index: int = 0

    @property
    def out(self) -> Path:
        return Path(self.folder) / "out"

    @property
    def progress_file(self) -> Path:
        return Path(self.folder) / "progress.jsonl"

    def shell_commands(self) -> list[str]:
        return [shlex.join(["conceptkit", *c]) for c in self.commands]

    def progress(self) -> dict:
        """{step, total, losses, seconds, it_s, eta_s} of the job's training command (from its progress log)."""
        lines = []
        if self.progress_file.exists():
            for line in self.progress_file.read_text().splitlines():
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:  # a line being written
                    break
        if not lines:
            return {"step": 0, "total": 0, "losses": [], "seconds": 0.0, "it_s": None, "eta_s": None}
        last = lines[-1]
        rate = last["step"] / last["seconds"] if last["seconds"] > 0 else None
        eta = (last["total"] - last["step"]) / rate if rate else None
        return {"step": last["step"], "total": last["total"], "losses": [x["loss"] for x in lines],
                "seconds": last["seconds"], "it_s": rate, "eta_s": eta}


def one_line_error(stderr: str, returncode: int) -> str:
    """What the page shows for a failed command: conceptkit's own 'error: ...' line, else the exception's last
    line (a bug: the full traceback stays in the job's stderr.log)."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    return lines[-1] if lines else f"the command ended with exit code {returncode}"


class JobQueue:
    """Jobs in `root`, run one at a time by a worker thread (CPU machines: two trainings at once only slow both)."""

    def __init__(self, root: str | Path, program: tuple[str, ...] = (sys.executable, "-m", "conceptkit.cli")):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # one server per workspace: a second one would re-queue or fail this one's jobs (held for the process' life;
        # each job's command locks its own out/ folder too)
        self.folder_lock = locks.acquire(self.root)
        self.program = list(program)  # what runs a command's arguments
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.pending: queue.Queue[str] = queue.Queue()
        self.process: subprocess.Popen | None = None
        for path in sorted(self.root.glob("*/job.json")):
            job = Job(**json.loads(path.read_text()))
            if job.status == "running":
                job.status, job.error = "failed", ("the UI server stopped while this job ran; its checkpoints are "
                                                   "kept in " + str(job.out))
                job.finished = job.finished or time.time()
                self._save(job)
            self.jobs[job.id] = job
        for job in sorted(self.jobs.values(), key=lambda j: j.created):
            if job.status == "queued":
                self.pending.put(job.id)
        threading.Thread(target=self._work, name="conceptkit-jobs", daemon=True).start()

    def submit(self, kind: str, title: str, commands: list[list[str]], prepare=None) -> Job:
        """Queue a job. `commands` may say {folder} (the job's folder), {out} (its output folder) and {progress}
        (its progress log); `prepare(out)` writes the job's inputs (uploaded images) before it is queued."""
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        folder = self.root / job_id
        job = Job(job_id, kind, title, [], str(folder))
        job.out.mkdir(parents=True)
        if prepare is not None:
            prepare(job.out)
        places = {"{folder}": str(folder), "{out}": str(job.out), "{progress}": str(job.progress_file)}
        for c in commands:
            job.commands.append([])
            for a in c:
                for k, v in places.items():
                    a = a.replace(k, v)
                job.commands[-1].append(a)
        with self.lock:
            self.jobs[job.id] = job
            self._save(job)
        self.pending.put(job.id)
        return job

    def get(self, job_id: str | None) -> Job | None:
        return self.jobs.get(job_id) if job_id else None

    def list(self, kinds: tuple[str, ...] | None = None) -> list[Job]:
        """Newest first."""
        jobs = [j for j in self.jobs.values() if kinds is None or j.kind in kinds]
        return sorted(jobs, key=lambda j: j.created, reverse=True)

    def position(self, job: Job) -> int:
        """How many jobs run or wait before this queued one."""
        return sum(1 for j in self.jobs.values() if j.status == "running"
                   or (j.status == "queued" and j.created < job.created))

    def cancel(self, job_id: str) -> None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.status in FINISHED:
                return
            was_running = job.status == "running"
            job.status, job.finished, job.error = "cancelled", time.time(), None
            self._save(job)
            if was_running and self.process is not None and self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)

    def wait(self, job_id: str, timeout: float) -> Job:
        """Block until the job is finished (for tests and scripts)."""
        end = time.time() + timeout
        while self.jobs[job_id].status not in FINISHED:
            if time.time() > end:
                raise TimeoutError(f"job {job_id} still {self.jobs[job_id].status} after {timeout:.0f} s")
            time.sleep(0.2)
        return self.jobs[job_id]

    def _save(self, job: Job) -> None:
        atomic_write_text(Path(job.folder) / "job.json", json.dumps(asdict(job), indent=1) + "\n")

    def _work(self) -> None:
        while True:
            job = self.jobs[self.pending.get()]
            with self.lock:
                if job.status != "queued":  # cancelled while waiting
                    continue
                job.status, job.started = "running", time.time()
                self._save(job)
            self._run(job)

    def _run(self, job: Job) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        stderr_path = Path(job.folder) / "stderr.log"
        for i, args in enumerate(job.commands):
            with self.lock:
                if job.status != "running":
                    return
                job.command_index = i
                self._save(job)
                with stderr_path.open("a") as err:
                    self.process = subprocess.Popen([*self.program, *args], env=env,
                                                    stdout=err, stderr=err, stdin=subprocess.DEVNULL,
                                                    start_new_session=True)
            code = self.process.wait()
            with self.lock:
                if job.status != "running":  # cancelled
                    return
                if code != 0:
                    job.status, job.finished = "failed", time.time()
                    job.error = one_line_error(stderr_path.read_text(errors="replace"), code)
                    self._save(job)
                    return
        with self.lock:
            job.status, job.finished = "done", time.time()
            self._save(job)
