"""A static HTML page in a self-contained folder: sections of text, picture rows, score tables and the shell commands
that made them.

No template engine: every string is escaped with html.escape. Pictures are referenced by paths relative to the
page; a picture outside the page's folder is first copied into DIR/assets/, so the folder can be zipped and moved.
index.html is written atomically.
"""
from __future__ import annotations

import hashlib
import html
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import UserError
from ..files import atomic_write, atomic_write_text

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1320px; margin: 24px auto; padding: 0 16px; color: #222; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ccc; padding-bottom: 4px; }
h3 { margin: 20px 0 6px; font-size: 16px; }
nav a { margin-right: 14px; }
code { background: #f2f2f2; padding: 0 3px; border-radius: 3px; }
pre { background: #f6f8fa; border: 1px solid #ddd; border-radius: 4px; padding: 8px 10px; white-space: pre-wrap;
      overflow-wrap: anywhere; font-size: 13px; margin: 4px 0 12px; }
pre.cmd::before { content: "$ "; color: #888; }
.label { font-size: 13px; color: #555; margin: 8px 0 0; }
.row { display: flex; flex-wrap: wrap; gap: 10px; margin: 6px 0 14px; }
figure { margin: 0; } figcaption { font-size: 12px; color: #444; line-height: 1.25; }
figure.wide figcaption { max-width: none; }
img { image-rendering: pixelated; border: 1px solid #ddd; display: block; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
.ok { color: #17803d; } .bad { color: #b3261e; }
.note { color: #777; font-size: 11px; }
table.grid td, table.grid th { vertical-align: top; text-align: left; } table.grid .row { margin: 2px 0; flex-wrap: nowrap; }
table.grid td.what { max-width: 170px; font-size: 13px; }
"""


@dataclass
class Picture:
    path: Path
    caption: str = ""
    note: str = ""  # a second, smaller caption line
    width: int | None = None  # display width in px (default: 64 px pictures at 2x, larger ones as they are)


@dataclass
class Section:
    title: str
    blocks: list[str] = field(default_factory=list)  # rendered HTML, in order
    page: "Page | None" = None

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-") or "section"

    def heading(self, text: str) -> "Section":
        self.blocks.append(f"<h3>{inline(text)}</h3>")
        return self

    def text(self, text: str) -> "Section":
        """A paragraph; `backticks` become code."""
        self.blocks.append(f"<p>{inline(text)}</p>")
        return self

    def figure(self, pic: Picture) -> str:
        href, width = self.page.link(pic.path), pic.width or display_width(pic.path)
        wide = ' class="wide"' if width > 200 else f' style="max-width: {max(width, 96)}px"'
        note = f'<br><span class="note">{inline(pic.note)}</span>' if pic.note else ""
        return (f'<figure{wide}><img src="{html.escape(href)}" width="{width}" alt="{html.escape(pic.caption)}">'
                f"<figcaption>{inline(pic.caption)}{note}</figcaption></figure>")

    def pictures(self, pictures: list[Picture], label: str = "") -> "Section":
        """One row of pictures with captions."""
        self.blocks.append((f'<p class="label">{inline(label)}</p>' if label else "")
                           + f'<div class="row">{"".join(self.figure(p) for p in pictures)}</div>')
        return self

    def grid(self, header: list[str], rows: list[tuple[str, list[list[Picture]]]], label: str = "") -> "Section":
        """A table of picture groups: one row per (label, groups), one column per group (e.g. per method)."""
        head = "".join(f"<th>{inline(h)}</th>" for h in header)
        body = "".join(f'<tr><td class="what">{inline(what)}</td>'
                       + "".join(f'<td><div class="row">{"".join(self.figure(p) for p in group)}</div></td>'
                                 for group in groups) + "</tr>" for what, groups in rows)
        self.blocks.append((f'<p class="label">{inline(label)}</p>' if label else "")
                           + f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
        return self

    def table(self, header: list[str], rows: list[list], label: str = "") -> "Section":
        """A score table; floats print with 3 decimals, a cell written **x** is bold."""
        head = "".join(f"<th>{inline(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
        self.blocks.append((f'<p class="label">{inline(label)}</p>' if label else "")
                           + f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def command(self, command: str, label: str = "reproduce") -> "Section":
        """The exact shell command, in a block of its own."""
        self.blocks.append(f'<p class="label">{inline(label)}</p><pre class="cmd">{html.escape(command)}</pre>')
        return self

    def code(self, text: str, label: str = "") -> "Section":
        self.blocks.append((f'<p class="label">{inline(label)}</p>' if label else "") + f"<pre>{html.escape(text)}</pre>")
        return self

    def html(self) -> str:
        return f'<section id="{self.anchor}"><h2>{html.escape(self.title)}</h2>{"".join(self.blocks)}</section>'


class Page:
    def __init__(self, out_dir: str | Path, title: str, intro: list[str] | tuple[str, ...] = ()):
        self.out_dir = Path(out_dir)
        self.title = title
        self.intro = list(intro)
        self.sections: list[Section] = []

    def section(self, title: str) -> Section:
        s = Section(title, page=self)
        self.sections.append(s)
        return s

    def link(self, path: str | Path) -> str:
        """The picture's path relative to the page; one outside the page's folder is copied into assets/ first."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"picture {path} does not exist: the step that makes it did not finish")
        root = self.out_dir.resolve()
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
            copy = self.out_dir / "assets" / f"{digest}-{path.name}"
            if not copy.is_file() or copy.read_bytes() != path.read_bytes():
                atomic_write(copy, lambda p: shutil.copyfile(path, p))
            resolved = copy.resolve()
        return resolved.relative_to(root).as_posix()

    def write(self, name: str = "index.html") -> Path:
        nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in self.sections)
        intro = "".join(f"<p>{inline(t)}</p>" for t in self.intro)
        body = "".join(s.html() for s in self.sections)
        text = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}'
                f"</title><style>{CSS}</style></head>\n<body><h1>{html.escape(self.title)}</h1>{intro}"
                f"<nav>{nav}</nav>\n{body}\n</body></html>\n")
        return atomic_write_text(self.out_dir / name, text)


def inline(text: str) -> str:
    """Escaped text in which `code` spans become <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def cell(value) -> str:
    if isinstance(value, bool):
        return '<span class="ok">yes</span>' if value else '<span class="bad">no</span>'
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if len(text) > 4 and text.startswith("**") and text.endswith("**"):
        return f"<strong>{inline(text[2:-2])}</strong>"
    return inline(text)


def display_width(path: Path) -> int:
    with Image.open(path) as im:
        return im.width * 2 if im.width <= 128 else im.width
