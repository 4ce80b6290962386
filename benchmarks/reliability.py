"""The reliability table: each row is one benchmark script, run as its own process, whose last output line is a
JSON object {"row", "handled", "tried", ...}.

    python benchmarks/reliability.py                  # every row, the issue's sizes (about 20 minutes on 2 cores)
    python benchmarks/reliability.py --only ui,inputs  # some rows

| row | script | what it does |
|---|---|---|
| kills survived | reliability_kills.py | SIGKILL learn ti/lora/promptnet at random moments (some during a checkpoint write), --resume, compare with an uninterrupted run |
| bad inputs handled | reliability_inputs.py | every file of the tests/bad_inputs corpus through the command it targets |
| processes tested | reliability_processes.py | training and generation with 2 processes against 1 |
| UI under load | reliability_ui_load.py | 20 concurrent generate requests to the web UI on loopback |
| option values refused | reliability_options.py | every bad value tests/option_sweep.py generates for every option of every command |
| lock races refused | reliability_locks.py | two learn ti processes started together on one --out |
| failed writes, nothing lost | reliability_writes.py | learn ti --resume under file-size limits (a full disk) and a read-only folder |
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = {  # name: (script, its arguments)
    "kills": ("reliability_kills.py", ["--trials", "10"]),
    "inputs": ("reliability_inputs.py", []),
    "processes": ("reliability_processes.py", []),
    "ui": ("reliability_ui_load.py", ["--requests", "20"]),
    "options": ("reliability_options.py", []),
    "locks": ("reliability_locks.py", ["--races", "3"]),
    "writes": ("reliability_writes.py", []),
}


def run_row(script: str, args: list[str]) -> dict:
    began = time.perf_counter()
    path = HERE / script
    if not path.exists():
        return {"row": script, "error": "script missing"}
    proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"row": script, "error": f"exit {proc.returncode}: {tail}"}
    result["seconds"] = round(time.perf_counter() - began)
    result["table"] = "\n".join(lines[:-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated rows: {', '.join(ROWS)}")
    parser.add_argument("--details", action="store_true", help="also print each script's own table")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",")] if args.only else list(ROWS)
    results = [run_row(*ROWS[n]) for n in names]
    print("| what | handled / tried | % | seconds |")
    print("|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['row']} | not measured ({r['error']}) | | |")
            continue
        extra = {k: v for k, v in r.items() if k not in ("row", "handled", "tried", "seconds", "table")}
        note = f" ({', '.join(f'{k} {v}' for k, v in extra.items())})" if extra else ""
        print(f"| {r['row']}{note} | {r['handled']} / {r['tried']} | {100 * r['handled'] / max(r['tried'], 1):.0f}% "
              f"| {r['seconds']} |")
    if args.details:
        for r in results:
            if r.get("table"):
                print(f"\n{r['row']}:\n{r['table']}")


if __name__ == "__main__":
    main()
