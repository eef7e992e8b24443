"""An explanation drawn as one PNG of a fixed size, and the page showing them all.

The PNG is ``WIDTH`` x ``HEIGHT`` pixels: on the left the test image, zero-shot's top-5 and
the decision (p0, p_ret, lambda, the final class); on the right the ``MAX_CANDIDATES``
most relevant surviving candidates, each with its relevance, OT distance, best
descriptions and up to ``MAX_THUMBNAILS`` retrieved database images, nearest first.
Images are placed pixel for pixel (``figimage``), never resampled by matplotlib.
"""

from __future__ import annotations

import html
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from ratta.atomic import atomic_path
from ratta.explain.evidence import Candidate, Explanation
from ratta.explain.pictures import WEB_SCHEMES, Picture, open_picture
from ratta.plots import DPI, pyplot

WIDTH, HEIGHT = 1600, 1200
TEST_SIZE = 440
THUMB, GAP, PER_ROW = 96, 4, 10
MAX_THUMBNAILS = 2 * PER_ROW
MAX_CANDIDATES = 4
MAX_DESCRIPTIONS = 3
_PANEL_TOP, _PANEL_HEIGHT, _RIGHT = 96, 272, 500
_BACKGROUND, _EMPTY = 255, 215


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


class _Canvas:
    """A figure addressed in pixels from its top-left corner."""

    def __init__(self) -> None:
        self.plt = pyplot()
        self.fig = self.plt.figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)

    def text(self, x: float, y: float, s: str, **kw: Any) -> None:
        kw.setdefault("va", "top")
        # texts come from files (names, descriptions, reasons): a "$" is a dollar sign
        self.fig.text(x / WIDTH, 1 - y / HEIGHT, s, parse_math=False, **kw)

    def image(self, x: int, y: int, pixels: np.ndarray) -> None:
        self.fig.figimage(pixels, xo=x, yo=HEIGHT - y - pixels.shape[0], origin="upper")

    def axes(self, x: float, y: float, w: float, h: float) -> Any:
        return self.fig.add_axes((x / WIDTH, 1 - (y + h) / HEIGHT, w / WIDTH, h / HEIGHT))

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            self.fig.savefig(tmp, format="png", dpi=DPI)
        self.plt.close(self.fig)


def _fit(picture: Picture, size: int) -> tuple[np.ndarray, str | None]:
    """``picture`` centred in a ``size`` square (uint8 RGB), or an empty square and why."""
    img, why = open_picture(picture, size)
    cell = np.full((size, size, 3), _BACKGROUND if img is not None else _EMPTY, np.uint8)
    if img is not None:
        arr = np.asarray(img)
        top, left = (size - arr.shape[0]) // 2, (size - arr.shape[1]) // 2
        cell[top : top + arr.shape[0], left : left + arr.shape[1]] = arr
    return cell, why


def draw(
    explanation: Explanation, names: list[str], config: dict[str, Any], path: Path
) -> list[str]:
    """Write the PNG of one explanation; returns the notes on pictures not shown."""
    e = explanation
    c = _Canvas()
    notes: list[str] = []
    truth = f" · true class: {names[e.label]}" if e.label is not None else ""
    c.text(
        20,
        14,
        f"test image {e.row} (split position {e.split_position}){truth}",
        size=15,
        weight="bold",
    )
    c.text(20, 40, _short(e.test.name, 200), size=9, color="dimgray")
    cell, why = _fit(e.test, TEST_SIZE)
    c.image(20, 70, cell)
    if why:
        if e.test.image is not None:  # unreadable; without a data root the page says so once
            notes.append(f"test image {e.test.name}: {why}")
        c.text(
            20 + TEST_SIZE / 2,
            70 + TEST_SIZE / 2,
            textwrap.fill(why, 40),
            ha="center",
            va="center",
            size=10,
        )
    _zero_shot(c, e, names)
    _decision(c, e, names)
    c.text(_RIGHT, 66, _candidates_title(e, config), size=12, weight="bold")
    if not e.candidates:
        _no_candidates(c, e, names, config)
    for k, cand in enumerate(e.candidates[:MAX_CANDIDATES]):
        notes += _panel(c, k, cand, len(e.top))
    if len(e.candidates) > MAX_CANDIDATES:
        more = len(e.candidates) - MAX_CANDIDATES
        c.text(_RIGHT, HEIGHT - 14, f"+ {more} less relevant candidates: see index.html", size=9)
    c.save(path)
    return notes


def _zero_shot(c: _Canvas, e: Explanation, names: list[str]) -> None:
    c.text(20, 530, "zero-shot (CuPL) top-5", size=12, weight="bold")
    ax = c.axes(190, 560, 260, 170)
    labels = [_short(names[k], 26) for k, _ in e.zero_shot][::-1]
    values = [p for _, p in e.zero_shot][::-1]
    colors = ["tab:blue" if k == e.final[0] else "lightgray" for k, _ in e.zero_shot][::-1]
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=9)
    for label in ax.get_yticklabels():
        label.set_parse_math(False)
    ax.set_xlim(0, 1)
    ax.tick_params(axis="x", labelsize=8)
    for i, v in enumerate(values):
        ax.text(min(v, 0.75) + 0.02, i, f"{v:.3f}", va="center", fontsize=8)
    c.text(190, 750, "blue: RA-TTA's decision", size=8, color="dimgray")


def _decision(c: _Canvas, e: Explanation, names: list[str]) -> None:
    z, r, f = e.zero_shot[0], e.retrieval, e.final
    lines = [
        ("zero-shot", f"{names[z[0]]}  (p0 {z[1]:.3f}, entropy H0 {e.entropy_zero_shot:.3f})"),
        ("retrieval", f"{names[r[0]]}  (p_ret {r[1]:.3f}, entropy {e.entropy_retrieval:.3f})"),
        ("lambda", f"{e.lam:.3f}  (weight of zero-shot: p = λ p0 + (1 - λ) p_ret)"),
        ("RA-TTA", f"{names[f[0]]}  (p {f[1]:.3f})"),
    ]
    c.text(20, 770, "decision", size=12, weight="bold")
    for i, (key, value) in enumerate(lines):
        c.text(20, 800 + 26 * i, key, size=10, weight="bold")
        c.text(100, 800 + 26 * i, _short(value, 62), size=10)
    verdict = "changed by RA-TTA" if e.changed else "unchanged by RA-TTA"
    if e.label is not None:
        verdict += "; correct" if f[0] == e.label else "; wrong"
    c.text(20, 920, verdict, size=12, weight="bold", color="tab:red" if e.changed else "black")


def _candidates_title(e: Explanation, config: dict[str, Any]) -> str:
    rule = f"classes owning >= {config['min_desc']} of the {len(e.top)} top descriptions"
    if not e.candidates:
        return f"no surviving candidate ({rule})"
    return f"{len(e.candidates)} surviving candidates ({rule}), most relevant first"


def _no_candidates(c: _Canvas, e: Explanation, names: list[str], config: dict[str, Any]) -> None:
    c.text(
        _RIGHT,
        _PANEL_TOP,
        f"No class owned {config['min_desc']} of the top descriptions: nothing was retrieved "
        "and RA-TTA kept the zero-shot prediction (λ = 1).\nThe top descriptions:",
        size=10,
    )
    for i, (d, label) in enumerate(e.top[:20]):
        line = f"{d.score:.3f}  {_short(names[label], 24)}:  {d.text}"
        c.text(_RIGHT, _PANEL_TOP + 50 + 20 * i, _short(line, 170), size=9)


def _panel(c: _Canvas, k: int, cand: Candidate, top: int) -> list[str]:
    """Candidate ``k``'s panel; returns notes on the pictures it could not show."""
    y = _PANEL_TOP + k * _PANEL_HEIGHT
    c.text(
        _RIGHT,
        y,
        f"{k + 1}. {_short(cand.name, 40)}: relevance {cand.relevance:.3f} · OT distance "
        f"{cand.ot_distance:.4f} · {len(cand.descriptions)} of the {top} top descriptions",
        size=11,
        weight="bold",
    )
    for i, d in enumerate(cand.descriptions[:MAX_DESCRIPTIONS]):
        c.text(_RIGHT + 10, y + 22 + 16 * i, _short(f"{d.score:.3f}  {d.text}", 170), size=9)
    shown = cand.pictures[:MAX_THUMBNAILS]
    top_y = y + 24 + 16 * MAX_DESCRIPTIONS
    reasons = {p.missing for p in shown if p.image is None and not p.url}
    if shown and len(reasons) == 1 and all(p.image is None and not p.url for p in shown):
        c.text(
            _RIGHT + 10,
            top_y + 10,
            "no thumbnails: " + textwrap.fill(reasons.pop() or "", 140),
            size=10,
            color="dimgray",
        )
        return []
    notes = []
    for j, pic in enumerate(shown):
        cell, why = _fit(pic, THUMB)
        x, yy = _RIGHT + (j % PER_ROW) * (THUMB + GAP), top_y + (j // PER_ROW) * (THUMB + GAP)
        c.image(x, yy, cell)
        if why:
            web = pic.image is None and bool(pic.url) and pic.url.startswith(WEB_SCHEMES)
            if not web:
                notes.append(f"database image {pic.name}: {why}")
            label = "web image" if web else "unreadable" if pic.image is not None else "no image"
            c.text(x + THUMB / 2, yy + THUMB / 2, label, ha="center", va="center", size=8)
    if len(cand.pictures) > MAX_THUMBNAILS:
        c.text(
            _RIGHT + PER_ROW * (THUMB + GAP),
            top_y,
            f"+{len(cand.pictures) - MAX_THUMBNAILS}",
            size=9,
        )
    return notes


# ------------------------------------------------------------------------------ the page

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
img.explanation { max-width: 100%; height: auto; border: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 90%; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
.changed { color: #c00; }
.note { color: #666; }
"""


def page(
    explanations: list[tuple[Explanation, str]],
    names: list[str],
    heading: str,
    notes: list[str],
) -> str:
    """index.html: every explanation's PNG (relative links) and its numbers as tables."""
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(heading)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(heading)}</h1>",
    ]
    parts += [f'<p class="note">{esc(n)}</p>' for n in notes]
    if not explanations:
        parts.append("<p>No test image to explain.</p>")
    else:
        links = (
            f'<a href="#image-{e.row}">{e.row}</a>' + (" *" if e.changed else "")
            for e, _ in explanations
        )
        parts.append(f"<p>Images (* changed by RA-TTA): {', '.join(links)}</p>")
    for e, png in explanations:
        parts += _section(e, png, names)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _section(e: Explanation, png: str, names: list[str]) -> list[str]:
    esc = html.escape
    z, f = e.zero_shot[0][0], e.final[0]
    mark = ' class="changed"' if e.changed else ""
    truth = f" (true class: {esc(names[e.label])})" if e.label is not None else ""
    out = [
        f'<section id="image-{e.row}">',
        f"<h2{mark}>Test image {e.row}: {esc(names[z])} → {esc(names[f])}{truth}</h2>",
        f"<p>{esc(e.test.name)}: zero-shot {esc(names[z])} ({e.zero_shot[0][1]:.4f}), "
        f"retrieval {esc(names[e.retrieval[0]])} ({e.retrieval[1]:.4f}), λ = {e.lam:.4f}, "
        f"RA-TTA {esc(names[f])} ({e.final[1]:.4f})</p>",
        f'<p><a href="{esc(png)}"><img class="explanation" src="{esc(png)}" width="{WIDTH}" '
        f'height="{HEIGHT}" alt="explanation of test image {e.row}"></a></p>',
        "<table><tr><th>candidate</th><th>relevance</th><th>OT distance</th>"
        "<th>its top descriptions (score)</th></tr>",
    ]
    for cand in e.candidates:
        descs = "<br>".join(f"{d.score:.4f} {esc(d.text)}" for d in cand.descriptions)
        out.append(
            f"<tr><td>{esc(cand.name)}</td><td>{cand.relevance:.4f}</td>"
            f"<td>{cand.ot_distance:.4f}</td><td>{descs}</td></tr>"
        )
    out.append("</table>")
    for cand in e.candidates:
        out.append(
            f"<table><tr><th colspan=4>retrieved for {esc(cand.name)}, nearest first</th></tr>"
        )
        out.append("<tr><th>database row</th><th>id</th><th>caption</th><th>image</th></tr>")
        for row, pic in zip(cand.retrieved, cand.pictures, strict=True):
            out.append(
                f"<tr><td>{row}</td><td>{esc(pic.name)}</td><td>{esc(pic.caption or '')}</td>"
                f"<td>{_where(pic)}</td></tr>"
            )
        out.append("</table>")
    out.append("</section>")
    return out


def _where(pic: Picture) -> str:
    """A link for a web address (and nothing else: no local paths, no other schemes)."""
    if pic.url and pic.url.startswith(WEB_SCHEMES):
        url = html.escape(pic.url, quote=True)
        return f'<a href="{url}" rel="noreferrer">{url}</a>'
    if pic.image is not None:
        return "local (in the PNG)"
    return html.escape(pic.missing or "")
