"""`conceptkit demo`: the showcase page."""
from __future__ import annotations

from . import options as o


def register(sub) -> None:
    p = sub.add_parser("demo", help="the showcase: Textual Inversion, CLoRA and ProFusion on the bundled model, "
                                    "scored by the oracle, as a static page OUT/index.html")
    p.add_argument("--out", type=o.path, default="outputs/demo")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds; the scores mean nothing), for tests")
    p.add_argument("--fresh", action="store_true", help="redo every step (default: reuse the finished steps whose "
                                                        "command is unchanged)")
    p.set_defaults(func=run, writes=("out",))


def run(args) -> None:
    from ..report.demo import run_demo
    from ..report.steps import shell

    command = shell(["conceptkit", "demo", "--out", args.out] + ["--quick"] * args.quick + ["--fresh"] * args.fresh)
    index = run_demo(args.out, quick=args.quick, fresh=args.fresh, command=command)
    print(f"wrote {index.resolve()}")
