"""`conceptkit report`: a static page from `evaluate ... --json` files."""
from __future__ import annotations

from . import options as o


def register(sub) -> None:
    p = sub.add_parser("report", help="a static page (OUT/index.html) from `evaluate ... --json` files")
    p.add_argument("json_files", type=o.path, nargs="+", metavar="JSON", help="files written by `conceptkit evaluate ... --json`")
    p.add_argument("--out", type=o.path, required=True, help="folder for index.html")
    p.set_defaults(func=run, writes=("out",))


def run(args) -> None:
    from ..report.evaluations import write_report
    from ..report.steps import shell

    index = write_report(args.json_files, args.out, shell(["conceptkit", "report", *args.json_files, "--out", args.out]))
    print(f"wrote {index.resolve()}")
