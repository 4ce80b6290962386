"""Every bad value tests/option_sweep.py generates from the parsers (every option of every command: wrong type, 0,
negative, NaN, ±inf, huge, empty), through the CLI. The LAST line is one JSON object:
{"row": "option values refused in one line", "handled": N, "tried": M, "commands": C, "options": O}.

    OMP_NUM_THREADS=1 python benchmarks/reliability_options.py [--verbose]

"Handled": exit code 2, exactly one stderr line `error: ...` naming the option, no traceback, nothing on stdout,
no file written. Values valid for an option (0 for --seed, '' for --negative-prompt: option_sweep's lists say why)
are not counted as tried.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verbose", action="store_true", help="print every case that was not handled")
    args = ap.parse_args()
    import option_sweep

    cases = [c for c in option_sweep.cases() if c.refuse]
    handled = 0
    with tempfile.TemporaryDirectory() as work:
        for i, case in enumerate(cases):
            folder = Path(work) / str(i)
            folder.mkdir()
            problems = option_sweep.run_case(case, folder).problems(case)
            handled += not problems
            if problems and args.verbose:
                print(f"{case.id}: {'; '.join(problems)}")
    print(f"| commands | options | bad values tried | refused in one line |\n|---|---|---|---|\n"
          f"| {len(list(option_sweep.commands()))} | {len({(c.command, c.option) for c in cases})} | {len(cases)} "
          f"| {handled} |")
    print(json.dumps({"row": "option values refused in one line", "handled": handled, "tried": len(cases),
                      "commands": len(list(option_sweep.commands())),
                      "options": len({(c.command, c.option) for c in cases})}))


if __name__ == "__main__":
    main()
