"""Lock races: two `conceptkit learn ti` processes started together on the same --out (seeds 0 and 5), N times.
The LAST line is one JSON object: {"row": "lock races refused", "handled": N, "tried": M}.

    OMP_NUM_THREADS=1 python benchmarks/reliability_locks.py [--races 3]

"Handled": one process succeeds, the other exits with code 2 and one `error:` line naming the folder (no
traceback), and the folder holds one consistent run (config.json and metadata.json record the winner's seed), with
no lock file left. Before locks, both succeeded and the folder mixed the two runs' files.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONCEPT = ROOT / "src/conceptkit/bundled/concepts/red-striped-star"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def race(out: Path) -> tuple[bool, str]:
    procs = [subprocess.Popen([sys.executable, "-m", "conceptkit", "learn", "ti", "--images", str(CONCEPT), "--token",
                               "<s>", "--batch", "1", "--no-validation", "--steps", "40", "--seed", str(seed),
                               "--out", str(out)], env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for seed in (0, 5)]
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    codes = [code for code, _ in results]
    if sorted(codes) != [0, 2]:
        return False, f"exit codes {codes}"
    err = results[codes.index(2)][1]
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    if len(lines) != 1 or str(out) not in lines[0] or "Traceback" in err:
        return False, f"refusal: {err[-300:]!r}"
    seed = (0, 5)[codes.index(0)]
    config = json.loads((out / "config.json").read_text())
    metadata = json.loads((out / "metadata.json").read_text())
    if not config["seed"] == metadata["seed"] == seed or (out / ".conceptkit.lock").exists():
        return False, f"mixed run: config seed {config['seed']}, metadata seed {metadata['seed']}, winner {seed}"
    return True, lines[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--races", type=int, default=3)
    args = ap.parse_args()
    handled = 0
    print("| race | handled | the refusal (or what went wrong) |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for i in range(args.races):
            ok, note = race(Path(work) / f"run{i}")
            handled += ok
            print(f"| {i} | {ok} | {note[:160]} |")
    print(json.dumps({"row": "lock races refused", "handled": handled, "tried": args.races}))


if __name__ == "__main__":
    main()
