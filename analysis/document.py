"""A report as a list of blocks, rendered twice: `report.md` and a self-contained `report.html`.

Why one model, two renderers: the markdown and the HTML report must say the same thing; building
both from the same blocks keeps them from drifting. The HTML embeds every image as base64 PNG
(the file opens anywhere, offline, and can be mailed) and is well-formed XML, so both
`html.parser` and an XML parser read it. Inline text may use a markdown subset - **bold**,
`code` and <u>underline</u> - which each renderer translates; everything else is escaped.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
blockquote { border-left: 4px solid crimson; margin: 0.5em 0; padding: 0.2em 1em; background: #fff3f3; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
.v-scales { color: #1a7f37; font-weight: bold; } .v-saturates { color: #4d7c0f; font-weight: bold; }
.v-peaks { color: #c2410c; font-weight: bold; } .v-inverse { color: #b91c1c; font-weight: bold; }
.v-flat { color: #555; font-weight: bold; } .v-noisy { color: #6d28d9; font-weight: bold; }
"""


@dataclass
class Cell:
    """A table cell: text, and a paper-style mark ("best": bold, "second": underlined)."""

    text: str
    mark: str = ""
    css: str = ""


@dataclass
class Block:
    kind: str  # heading, para, bullets, table, image, pre, warning
    text: str = ""
    level: int = 2
    items: list = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    align: list[str] = field(default_factory=list)
    path: Path | None = None
    link: str = ""


class Document:
    def __init__(self, title: str):
        self.title = title
        self.blocks: list[Block] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Block("heading", text, level))

    def para(self, text: str) -> None:
        self.blocks.append(Block("para", text))

    def warning(self, text: str) -> None:
        self.blocks.append(Block("warning", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(Block("bullets", items=list(items)))

    def pre(self, text: str) -> None:
        self.blocks.append(Block("pre", text))

    def table(self, header: list[str], rows: list[list], align: list[str] | None = None) -> None:
        """`rows` of Cell or plain values; `align` per column: "l" or "r" (default: r after the first)."""
        cells = [[c if isinstance(c, Cell) else Cell(str(c)) for c in row] for row in rows]
        self.blocks.append(Block("table", header=list(header), items=cells,
                                 align=align or ["l"] + ["r"] * (len(header) - 1)))

    def image(self, path: Path, caption: str, rel: str, link: str = "") -> None:
        """An image at `path` (embedded in the HTML), linked from markdown as `rel`; `link`: its SVG."""
        self.blocks.append(Block("image", text=caption, path=Path(path), link=link, items=[rel]))

    # -- markdown ---------------------------------------------------------------------------------
    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if b.kind == "heading":
                out += ["#" * b.level + " " + b.text, ""]
            elif b.kind == "para":
                out += [b.text, ""]
            elif b.kind == "warning":
                out += [f"> **{b.text}**", ""]
            elif b.kind == "bullets":
                out += [f"- {i}" for i in b.items] + [""]
            elif b.kind == "pre":
                out += ["```", b.text.rstrip("\n"), "```", ""]
            elif b.kind == "table":
                out += _md_table(b) + [""]
            elif b.kind == "image":
                out += [f"![{b.text}]({b.items[0]})"] + ([f"[SVG]({b.link})"] if b.link else []) + [""]
        return "\n".join(out)

    # -- html -------------------------------------------------------------------------------------
    def html(self) -> str:
        body = [f"<h1>{_inline(self.title)}</h1>"]
        for b in self.blocks:
            if b.kind == "heading":
                body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
            elif b.kind == "para":
                body.append(f"<p>{_inline(b.text)}</p>")
            elif b.kind == "warning":
                body.append(f"<blockquote><p><b>{_inline(b.text)}</b></p></blockquote>")
            elif b.kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
            elif b.kind == "pre":
                body.append(f"<pre>{html.escape(b.text)}</pre>")
            elif b.kind == "table":
                body.append(_html_table(b))
            elif b.kind == "image":
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}"/>'
                            f"<figcaption>{_inline(b.text)}</figcaption></figure>")
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>"
                f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head>\n<body>\n"
                + "\n".join(body) + "\n</body></html>\n")


def _md_cell(c: Cell) -> str:
    text = c.text.replace("|", "\\|")
    return {"best": f"**{text}**", "second": f"<u>{text}</u>"}.get(c.mark, text) if text else text


def _md_table(b: Block) -> list[str]:
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in b.align) + "|"
    return (["| " + " | ".join(h.replace("|", "\\|") for h in b.header) + " |", rule]
            + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.items])


def _html_table(b: Block) -> str:
    head = "".join(f"<th>{_inline(h)}</th>" for h in b.header)
    rows = []
    for row in b.items:
        tds = []
        for c, a in zip(row, b.align, strict=False):
            text = _inline(c.text)
            text = {"best": f"<b>{text}</b>", "second": f"<u>{text}</u>"}.get(c.mark, text)
            cls = " ".join(x for x in ("num" if a == "r" else "", c.css) if x)
            tds.append(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _inline(text: str) -> str:
    """Escape, then translate the markdown subset (**bold**, `code`, <u>x</u>) into tags."""
    s = html.escape(str(text), quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"&lt;u&gt;(.+?)&lt;/u&gt;", r"<u>\1</u>", s)
