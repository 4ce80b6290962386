"""Failed writes: `learn ti --resume` of a finished 4-step run to 8 steps under file-size limits that make a different
write fail each time (a full disk, for one process: RLIMIT_FSIZE with SIGXFSZ ignored), and with a read-only
checkpoint folder. The LAST line is one JSON object: {"row": "failed writes, nothing lost", "handled": N, "tried": M}.

    OMP_NUM_THREADS=1 python benchmarks/reliability_writes.py

"Handled": exit code 2, one `error:` line, no traceback; every file of the earlier run byte-identical (config.json
may record the new --steps) and readable; no temporary file left.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONCEPT = ROOT / "src/conceptkit/bundled/concepts/red-striped-star"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
LIMITED = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0})); from conceptkit.cli import main; "
           "sys.exit(main(sys.argv[1:]))")
LIMITS = (100, 300, 700, 1000, 1500)  # bytes: the lock record, config.json, a checkpoint fail in turn
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search",
          "--"] if os.geteuid() == 0 and shutil.which("setpriv") else []


def learn(out: Path, steps: int, *extra: str) -> list[str]:
    return ["learn", "ti", "--images", str(CONCEPT), "--token", "<s>", "--batch", "1", "--no-validation",
            "--checkpoint-every", "2", "--steps", str(steps), "--out", str(out), *extra]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "config.json"}


def trial(out: Path, prefix: list[str], note: str) -> tuple[bool, str]:
    from conceptkit.files import interrupted_writes

    before = snapshot(out)
    proc = subprocess.run([*prefix, *learn(out, 8, "--resume")], env=ENV, capture_output=True, text=True,
                          timeout=600)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    problems = []
    if proc.returncode != 2 or len(lines) != 1 or "Traceback" in proc.stderr:
        problems.append(f"exit {proc.returncode}, {len(lines)} error lines")
    if snapshot(out) != before:
        problems.append("earlier files changed")
    if interrupted_writes(out):
        problems.append("temporary files left")
    json.loads((out / "config.json").read_text())
    return not problems, f"{note}: {'; '.join(problems) or (lines[0][:140] if lines else '')}"


def main() -> None:
    from conceptkit.cli import main as cli

    results = []
    print("| case | nothing lost | the error line (or what went wrong) |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for limit in LIMITS:
            out = Path(work) / f"limit{limit}"
            assert cli(learn(out, 4)) == 0
            results.append(trial(out, [sys.executable, "-c", LIMITED.format(limit)], f"file-size limit {limit} B"))
        if NO_DAC or os.geteuid() != 0:
            out = Path(work) / "read-only"
            assert cli(learn(out, 4)) == 0
            (out / "checkpoints").chmod(0o555)
            results.append(trial(out, [*NO_DAC, sys.executable, "-m", "conceptkit"], "read-only checkpoints/"))
            (out / "checkpoints").chmod(0o755)
    for ok, note in results:
        print(f"| {note.split(':')[0]} | {ok} | {note.split(': ', 1)[1]} |")
    print(json.dumps({"row": "failed writes, nothing lost", "handled": sum(ok for ok, _ in results),
                      "tried": len(results)}))


if __name__ == "__main__":
    main()
