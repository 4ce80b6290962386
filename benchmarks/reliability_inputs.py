"""Run every case of the malformed-input corpus (tests/bad_inputs/cases.json) through the CLI, as the tests do,
and print a table: case, expected outcome, actual outcome, handled. The LAST line is one JSON object:
{"row": "bad inputs handled", "handled": N, "tried": M}.

    OMP_NUM_THREADS=1 python benchmarks/reliability_inputs.py [--only SUBSTRING] [--verbose]

"Handled" means: the expected outcome (a one-line error with exit code 2 naming the input, or the documented
graceful handling with exit code 0), no pickle ran code, and the user's files in --out are unchanged (a failed run
writes nothing there). Regenerate the corpus with `python tests/bad_inputs/make_corpus.py`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "bad_inputs"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run only cases whose id contains this")
    ap.add_argument("--verbose", action="store_true", help="also print each case's message")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    import bad_inputs_runner as runner

    cases = [c for c in runner.CASES if not args.only or args.only in c["id"]]
    rows, began = [], time.perf_counter()
    with runner.cached_toy_pipeline():
        for case in cases:
            with tempfile.TemporaryDirectory() as work:
                rows.append(runner.run_case(case, Path(work)))
    width = max(len(c["id"]) for c in cases)
    print(f"{'case':{width}}  expected  outcome  handled")
    for r in rows:
        print(f"{r.case['id']:{width}}  {r.case['expect']:8}  {r.outcome:7}  {'yes' if r.handled else 'NO: ' + r.why}")
        if args.verbose and r.message:
            print(f"{'':{width}}    {r.message[:200]}")
    handled = sum(r.handled for r in rows)
    print(f"{handled}/{len(rows)} handled in {time.perf_counter() - began:.0f} s")
    print(json.dumps({"row": "bad inputs handled", "handled": handled, "tried": len(rows)}))


if __name__ == "__main__":
    main()
