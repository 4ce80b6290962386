"""The web UI's job queue (ui/jobs.py), with a stand-in program instead of the conceptkit CLI, so each test takes a
second: order, persistence across a server restart, cancel, and one-line errors."""
import json
import sys
import time

import pytest

from conceptkit.ui.jobs import Job, JobQueue, one_line_error

# argv: sleep SECONDS | fail MESSAGE | crash | progress FILE TOTAL | touch FILE
FAKE = r'''
import json, sys, time
cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "sleep":
    time.sleep(float(args[0]))
elif cmd == "fail":
    print("loading...", file=sys.stderr)
    print("error: " + args[0], file=sys.stderr)
    sys.exit(2)
elif cmd == "crash":
    raise RuntimeError("shapes do not broadcast")
elif cmd == "progress":
    for i in range(int(args[1])):
        with open(args[0], "a") as f:
            f.write(json.dumps({"step": i + 1, "total": int(args[1]), "loss": 1.0 / (i + 1), "seconds": 0.1 * (i + 1)}) + "\n")
elif cmd == "touch":
    open(args[0], "w").write(str(time.time()))
'''


@pytest.fixture
def program(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    return (sys.executable, str(script))


def test_jobs_run_in_order_one_at_a_time(tmp_path, program):
    queue = JobQueue(tmp_path / "jobs", program=program)
    first = queue.submit("ti", "first", [["sleep", "0.5"], ["touch", "{out}/a"]])
    second = queue.submit("lora", "second", [["touch", "{out}/b"]])
    assert queue.position(second) >= 1  # behind the first
    queue.wait(second.id, 30)
    assert queue.get(first.id).status == "done" and queue.get(second.id).status == "done"
    assert float((first.out / "a").read_text()) <= float((second.out / "b").read_text())
    assert [j.id for j in queue.list()] == [second.id, first.id]  # newest first
    assert [j.id for j in queue.list(("ti",))] == [first.id]


def test_placeholders_and_progress(tmp_path, program):
    queue = JobQueue(tmp_path / "jobs", program=program)
    job = queue.wait(queue.submit("ti", "t", [["progress", "{progress}", "4"]]).id, 30)
    p = job.progress()
    assert (p["step"], p["total"]) == (4, 4)
    assert p["losses"] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    assert p["it_s"] == pytest.approx(10.0) and p["eta_s"] == 0
    assert job.commands[0][1] == str(job.progress_file)
    assert job.shell_commands()[0].startswith("conceptkit progress ")


def test_failure_keeps_the_one_line_error_and_stops_the_job(tmp_path, program):
    queue = JobQueue(tmp_path / "jobs", program=program)
    job = queue.wait(queue.submit("ti", "t", [["fail", "images/x.png is not an image"], ["touch", "{out}/never"]]).id, 30)
    assert job.status == "failed" and job.error == "images/x.png is not an image"
    assert not (job.out / "never").exists()
    crashed = queue.wait(queue.submit("ti", "t", [["crash"]]).id, 30)
    assert crashed.status == "failed" and crashed.error == "RuntimeError: shapes do not broadcast"
    assert "Traceback" in (crashed.out.parent / "stderr.log").read_text()  # the full story stays on disk


def test_cancel_running_and_queued(tmp_path, program):
    queue = JobQueue(tmp_path / "jobs", program=program)
    running = queue.submit("ti", "long", [["sleep", "30"], ["touch", "{out}/after"]])
    waiting = queue.submit("ti", "waiting", [["touch", "{out}/w"]])
    deadline = time.time() + 20
    while queue.get(running.id).status != "running" and time.time() < deadline:
        time.sleep(0.05)
    queue.cancel(waiting.id)
    began = time.time()
    queue.cancel(running.id)
    assert queue.wait(running.id, 10).status == "cancelled"
    time.sleep(0.5)
    assert time.time() - began < 5  # the process was stopped, not waited for
    assert not (running.out / "after").exists() and not (waiting.out / "w").exists()
    assert queue.get(waiting.id).status == "cancelled"


def test_restart_requeues_waiting_jobs_and_fails_the_interrupted_one(tmp_path, program):
    root = tmp_path / "jobs"
    # the state a server leaves behind when it stops with one job running and one waiting
    for status, name in (("running", "a"), ("queued", "b")):
        job = Job(f"2026-{name}", "ti", name, [["touch", "{out}/ran"]], str(root / f"2026-{name}"),
                  created=time.time() + (name == "b"))
        job.out.mkdir(parents=True)
        job.commands = [["touch", str(job.out / "ran")]]
        job.status = status
        (root / job.id / "job.json").write_text(json.dumps(job.__dict__))
    queue = JobQueue(root, program=program)
    interrupted = queue.get("2026-a")
    assert interrupted.status == "failed" and "stopped while this job ran" in interrupted.error
    assert queue.wait("2026-b", 30).status == "done" and (queue.get("2026-b").out / "ran").exists()
    assert not (interrupted.out / "ran").exists()


def test_one_line_error_prefers_conceptkit_errors():
    assert one_line_error("step 1\nerror: no such file a.png\n", 2) == "no such file a.png"
    assert one_line_error("Traceback...\n  File x\nValueError: bad\n", 1) == "ValueError: bad"
    assert one_line_error("", 137) == "the command ended with exit code 137"
