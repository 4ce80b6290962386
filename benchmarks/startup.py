"""Start-up and one-image wall time of the CLI (issue 21): `conceptkit --help`, `conceptkit info`, `conceptkit
shapes read IMAGE`, a one-image `conceptkit generate --model toy` (30 DDIM steps, 64 px) and a mistake (`generate`
without a prompt, refused before torch loads), each in a fresh process, the commands interleaved, `--repeats`
rounds. Prints the median wall time and the median CPU time of the child (user + system, from its rusage), with the
spread (min-max) of the wall times.

    python benchmarks/startup.py --repeats 5

Targets (issue 21): --help <= 0.5 s, one-image generate <= 3 s wall, on 2 cores. On a shared machine the figures are
contended: say so when quoting them.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def timed(cmd: list[str], env: dict, code: int = 0) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - began
    assert done.returncode == code, f"{cmd}: exit code {done.returncode}, not {code}"
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(args.threads)}
    tmp = Path(tempfile.mkdtemp(prefix="ck-startup-"))
    ck = [sys.executable, "-m", "conceptkit"]
    subprocess.run(ck + ["shapes", "sample", "--n", "1", "--out", str(tmp / "shapes")], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    image = str(next((tmp / "shapes").glob("*.png")))
    commands = {
        "conceptkit --help": ck + ["--help"],
        "conceptkit info": ck + ["info"],
        "conceptkit shapes read IMAGE": ck + ["shapes", "read", image],
        "conceptkit generate --model toy (1 image, 30 steps)": ck + [
            "generate", "--model", "toy", "--prompt", "a large red striped circle in the center, on a navy background",
            "--num-images", "1", "--steps", "30", "--out", str(tmp / "gen")],
        "conceptkit generate (no prompt: a one-line error)": ck + ["generate", "--out", str(tmp / "refused")],
    }
    codes = {"conceptkit generate (no prompt: a one-line error)": 2}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    timed(ck + ["--help"], env)  # warm the file cache
    for _ in range(args.repeats):
        for name, cmd in commands.items():  # interleaved
            results[name].append(timed(cmd, env, codes.get(name, 0)))
    print(f"| command | median wall s | wall min-max s | median CPU s | rounds |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        print(f"| `{name}` | {statistics.median(walls):.2f} | {min(walls):.2f}-{max(walls):.2f} | "
              f"{statistics.median(cpus):.2f} | {len(runs)} |")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
