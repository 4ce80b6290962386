"""A guard over the source: conceptkit never unpickles with code execution allowed, never trusts remote code."""
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "conceptkit"


def calls(pattern: str) -> list[tuple[str, str]]:
    """(file:line, the call's text up to its closing parenthesis) for every match of `pattern` in the package."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(pattern, text):
            depth, end = 0, m.end()
            for end in range(m.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            line = text.count("\n", 0, m.start()) + 1
            found.append((f"{path.relative_to(SRC)}:{line}", text[m.start():end + 1]))
    return found


def test_every_torch_load_is_weights_only():
    loads = calls(r"\btorch\.load\(")
    assert loads, "the scan found no torch.load at all: is SRC right?"
    unsafe = [where for where, call in loads if "weights_only=True" not in call]
    assert unsafe == []


def test_no_pickle_loads_and_no_remote_code():
    assert calls(r"\bpickle\.loads?\(") == []
    for path in SRC.rglob("*.py"):
        assert "trust_remote_code=True" not in path.read_text(), path
