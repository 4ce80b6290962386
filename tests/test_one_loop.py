"""A guard over the source: one file denoises. Every method is a plug-in of generate/loop.py (DESIGN: "one sampling
loop; methods plug in, they do not fork it"), so a fix there reaches every method."""
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "conceptkit"


def files_matching(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if re.search(pattern, p.read_text()))


def test_only_the_loop_steps_a_scheduler_and_no_pipeline_is_called():
    assert files_matching(r"scheduler\.step\(") == ["generate/loop.py"]
    assert files_matching(r"\bpipe(line)?\(") == []
    assert files_matching(r"\.prev_sample\b") == []
