"""The web UI under load: N concurrent generate requests on loopback (Gradio's API, one client thread each).

Every request asks for its own prompt and seed; an answer counts only if it holds exactly the images asked for,
saved in a folder of its own (no answer may show another request's images). Prints a table, then as its last line
one JSON object for benchmarks/reliability.py.

    python benchmarks/reliability_ui_load.py --requests 20 --steps 10
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

COLOURS = ["red", "blue", "green", "yellow", "pink", "purple", "cyan", "orange"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(requests: int, steps: int, images: int) -> dict:
    from gradio_client import Client

    from conceptkit.ui.app import serve

    work = tempfile.mkdtemp(prefix="ui-load-")
    port = free_port()
    app, _ = serve(port=port, work=work, block=False)
    url = f"http://127.0.0.1:{port}/"

    def one(i: int) -> dict:
        client = Client(url, verbose=False)
        prompt = f"a large {COLOURS[i % len(COLOURS)]} plain circle in the center, on a white background"
        began = time.perf_counter()
        try:
            gallery, info = client.predict("toy", prompt, "", 1000 + i, steps, 7.5, "ddim", images, [], [], "",
                                           api_name="/generate")
        except Exception as e:  # a lost or failed request is a finding, not a crash of the benchmark
            return {"i": i, "ok": False, "why": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - began}
        folder = info.split("saved in `", 1)[-1].split("`", 1)[0]
        own = f"--seed {1000 + i} " in info and f"{COLOURS[i % len(COLOURS)]} plain" in info
        ok = len(gallery) == images and own and len(os.listdir(folder)) == images + 1  # + grid.png
        return {"i": i, "ok": ok, "why": "" if ok else f"{len(gallery)} images, own command {own}",
                "seconds": time.perf_counter() - began, "folder": folder}

    began = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        answers = list(pool.map(one, range(requests)))
    total = time.perf_counter() - began
    app.close()
    folders = {a.get("folder") for a in answers if a["ok"]}
    return {"requests": requests, "answered": sum(a["ok"] for a in answers), "distinct_folders": len(folders),
            "seconds_to_last_answer": round(total, 1),
            "median_seconds": round(sorted(a["seconds"] for a in answers)[len(answers) // 2], 1),
            "failures": [a for a in answers if not a["ok"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=1)
    args = parser.parse_args()
    r = run(args.requests, args.steps, args.images)
    print("| concurrent generate requests | answered with their own images | distinct output folders | "
          "time to last answer (s) | median answer time (s) |")
    print("|---|---|---|---|---|")
    print(f"| {r['requests']} | {r['answered']} | {r['distinct_folders']} | {r['seconds_to_last_answer']} | "
          f"{r['median_seconds']} |")
    for f in r["failures"]:
        print(f"request {f['i']}: {f['why']}", file=sys.stderr)
    print(json.dumps({"row": "UI under load", "handled": r["answered"], "tried": r["requests"],
                      "seconds_to_last_answer": r["seconds_to_last_answer"]}))


if __name__ == "__main__":
    main()
