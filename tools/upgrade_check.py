"""Would today's newest releases of our dependencies break conceptkit? (`make upgrade-check`; not part of CI.)

Builds a throw-away virtual environment with the newest releases pyproject.toml's lower bounds admit (its upper
bounds lifted; torch stays pinned: the local CPU wheel), prints every version that differs from the lock, runs the
fast tests there and prints one line per distinct failure, so a release that breaks us is noticed by us first.

    python3 tools/upgrade_check.py                 # exit 0: nothing broke; 1: something did; 2: could not build
    python3 tools/upgrade_check.py --keep /tmp/up  # keep the environment (to bisect by hand)

Refreshing the lock after a good check: raise the upper bounds in pyproject.toml, `make lock`, `make test`.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Slow or machine-bound tests (a browser, kills and resumes, several processes): the dependency-facing code paths
# they reach are covered by the rest. The check aims to answer in a few minutes.
SLOW_TESTS = ["tests/test_ui_browser.py", "tests/test_interruption.py", "tests/test_distributed.py",
              "tests/test_report.py::test_demo_quick_end_to_end"]


def unbounded(requirement: str) -> str:
    """'transformers>=5.0,<5.24' -> 'transformers>=5.0'; exact pins ('torch==2.13.0') are kept."""
    name = re.match(r"[A-Za-z0-9_.\-\[\],]+", requirement).group(0)
    spec = requirement[len(name):]
    kept = [s.strip() for s in spec.split(",") if s.strip() and not s.strip().startswith("<")]
    return name + ",".join(kept)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines: list[str]) -> dict[str, str]:
    """{package: version} from `pip freeze` output or a lock file."""
    out = {}
    for line in lines:
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", line)
        if m:
            out[normalise(m.group(1))] = m.group(2)
    return out


def newer_than_installable(py: str, names: list[str], installed: dict[str, str]) -> list[str]:
    """One line for each package whose newest release on the index was not installed, saying why pip refuses it
    (e.g. it needs a dependency release that does not exist)."""
    lines = []
    for name in dict.fromkeys(names):
        if name == "torch":
            continue
        listed = run([py, "-m", "pip", "index", "versions", name]).stdout.splitlines()
        m = re.match(rf"^\S+ \((\S+)\)", listed[0]) if listed else None
        if m is None or installed.get(normalise(name)) in (None, m.group(1)):
            continue
        newest = m.group(1)
        trial = run([py, "-m", "pip", "install", "--dry-run", "-q", f"{name}=={newest}"])
        errors = [ln.removeprefix("ERROR: ") for ln in trial.stderr.splitlines() if ln.startswith("ERROR:")]
        why = next((e for e in errors if "No matching distribution" in e or "conflict" in e.lower()),
                   errors[-1] if errors else held_back_by(py, name, newest))
        lines.append(f"{name} {newest} (the newest) is not installable, so {installed[normalise(name)]} was "
                     f"tested: {why}")
    return lines


HELD_BACK = """
import sys
from importlib.metadata import distributions
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name
name, version = canonicalize_name(sys.argv[1]), sys.argv[2]
for dist in distributions():
    for text in dist.requires or []:
        req = Requirement(text)
        if canonicalize_name(req.name) == name and not req.specifier.contains(version, prereleases=True):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                print(f"{dist.metadata['Name']} requires {req.name}{req.specifier}")
"""


def held_back_by(py: str, name: str, version: str) -> str:
    """Which installed packages' requirements exclude `name==version`."""
    found = run([py, "-c", HELD_BACK, name, version]).stdout.split("\n")
    found = sorted({ln for ln in found if ln.strip()})
    return "; ".join(found) if found else "pip's resolver chose an older release"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def failures(junit: Path) -> list[tuple[str, str]]:
    """(test id, last line of its error) for every failed or erroring test in a JUnit XML report."""
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                text = (node.get("message") or node.text or "").strip()
                lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
                last = next((ln for ln in reversed(lines) if re.match(r"^(E\s+)?[A-Za-z_.]*(Error|Exception)\b", ln)),
                            lines[-1] if lines else tag)
                last = re.sub(r'^failed on setup with "(.*)"$', r"\1", re.sub(r"^E\s+", "", last))
                out.append((f"{case.get('classname')}::{case.get('name')}", last[:300]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="build the environment in this folder and keep it")
    parser.add_argument("--all-tests", action="store_true", help="run the slow tests too")
    args = parser.parse_args(argv)

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [unbounded(r) for r in project["dependencies"]]
    for extra in ("test", "ui"):
        wanted += [unbounded(r) for r in project["optional-dependencies"][extra]]
    locked = pins((ROOT / "requirements" / "lock.txt").read_text().splitlines())

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="conceptkit-upgrade-"))
    venv = work / "venv"
    py = str(venv / "bin" / "python")
    print(f"building {venv} with the newest releases of: {' '.join(wanted)}", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [py, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools>=77"],
        [py, "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager", *wanted],
        [py, "-m", "pip", "install", "-q", "--no-deps", "-r", str(ROOT / "requirements" / "no-deps.txt")],
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
    ]
    for cmd in steps:
        p = run(cmd)
        if p.returncode != 0:
            err = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
            print(f"upgrade check: could not build the environment ({' '.join(cmd[2:5])}): "
                  f"{err[-1] if err else p.returncode}")
            return 2

    newest = pins(run([py, "-m", "pip", "freeze"]).stdout.splitlines())
    changed = sorted((n, locked[n], newest[n]) for n in locked if n in newest and newest[n] != locked[n])
    added = sorted(n for n in newest if n not in locked and n not in ("conceptkit", "open-clip-torch", "pip"))
    print(f"\n{len(changed)} of {len(locked)} locked packages have newer releases:")
    for name, old, new in changed:
        print(f"  {name} {old} -> {new}")
    if added:
        print(f"new packages pulled in: {', '.join(added)}")
    for line in newer_than_installable(py, [re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in wanted], newest):
        print(line)
    # open_clip_torch is installed without its dependencies on purpose, and our own upper bounds were lifted
    conflicts = [ln for ln in run([py, "-m", "pip", "check"]).stdout.splitlines()
                 if ln.strip() and not ln.startswith(("open-clip-torch", "conceptkit ", "No broken"))]
    if conflicts:
        print("pip check: " + "; ".join(conflicts))

    junit = work / "junit.xml"
    cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "tests"]
    if not args.all_tests:
        cmd += [f"--ignore={t}" if t.endswith(".py") else f"--deselect={t}" for t in SLOW_TESTS]
    print(f"\nrunning the {'whole suite' if args.all_tests else 'fast tests'} there ...", flush=True)
    p = run(cmd, cwd=ROOT)
    counts = [ln for ln in p.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    summary = counts[-1].strip("= ") if counts else "(no test summary)"
    if not junit.exists():
        print(f"upgrade check: the tests did not run: {summary}")
        return 2
    broken = failures(junit)
    if not broken:
        print(f"OK: nothing broke with the newest releases ({summary}). To adopt them: raise pyproject.toml's "
              "upper bounds, `make lock`, `make test`.")
        return 0
    by_error: dict[str, list[str]] = defaultdict(list)
    for test, error in broken:
        by_error[error].append(test)
    upgraded = ", ".join(f"{n} {new} (locked {old})" for n, old, new in changed
                         if n in {"torch", "diffusers", "transformers", "peft", "accelerate", "gradio", "safetensors"})
    print(f"BROKEN with the newest releases [{upgraded or 'no core package changed'}]: {len(broken)} tests "
          f"({summary}); by error:")
    for error, tests in sorted(by_error.items(), key=lambda kv: -len(kv[1])):
        files = Counter(t.split("::")[0] for t in tests)
        print(f"  {len(tests):4d} x {error}   [{', '.join(f'{f} {n}' for f, n in files.most_common(3))}]")
    if not args.keep:
        print(f"(environment left in {work}; delete it when done)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
