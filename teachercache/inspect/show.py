"""`teachercache show`: one row of a cache as a person reads it.

The row's text decoded with the cache's own tokenizer (CACHE/tokenizer/), then per target position the
actual next token and the teacher's top alternatives from the stored set with their probabilities, the
mass outside the stored set and the entropy. Probabilities are exp() of the decoded cache log-probs,
nothing recomputed, so what is shown is what a student trains on. The actual next token's probability
comes from the label_logprob column (1/1024-nat steps), so where that token is also in the stored list
its two probabilities can differ in the third digit: the stored entry's quantiser step is coarser. Plain text (coloured when the output is
a terminal: green where the actual next token is the teacher's top id, yellow where it is stored lower
down, red where it is outside the stored set) or a self-contained HTML page.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass

import numpy as np

from teachercache.errors import TeachercacheError
from teachercache.format.cache import Cache
from teachercache.inspect.rows import CacheRow, read_row


@dataclass(frozen=True)
class Alternative:
    token_id: int
    text: str
    prob: float
    """exp(stored log-prob)."""
    count: int | None = None
    """Sampled targets: draws of this id."""


@dataclass(frozen=True)
class PositionView:
    position: int
    """Token index t in the row; the stored distribution predicts token t+1."""
    context: str
    """Text of token t."""
    next_id: int
    next_text: str
    next_prob: float
    """exp(label log-prob): the teacher's probability of the actual next token (stored or not)."""
    next_rank: int
    """1-based rank of the actual next token in the stored set, 0 when it is not stored."""
    top: tuple[Alternative, ...]
    stored: int
    """Ids stored at this position."""
    rest_mass: float
    entropy: float


@dataclass(frozen=True)
class RowView:
    cache: str
    row: int
    shard: str
    text: str
    tokens: int
    positions: tuple[PositionView, ...]


def cache_tokenizer(cache: Cache):
    """The cache's own copy of the teacher's tokenizer (``Cache.tokenizer``): its files checked, loaded without
    running code (files that name custom code are refused, never imported, never asked about on stdin), and
    compared with the manifest's fingerprint, so a replaced tokenizer is refused rather than shown."""
    return cache.tokenizer()


def parse_positions(spec: str | None) -> slice:
    """'a:b' (either side may be empty) -> slice of token indices; None -> all."""
    if not spec:
        return slice(None)
    try:
        a, b = spec.split(":")
        return slice(int(a) if a.strip() else None, int(b) if b.strip() else None)
    except ValueError:
        raise TeachercacheError(f"--positions {spec!r}: give a range of token indices like 10:20") from None


def show_row(path: str | os.PathLike, row: int, positions: slice = slice(None), top: int = 5) -> RowView:
    """The view of row ``row`` of the cache at ``path``: its text and, for the target positions whose
    token index falls in ``positions``, the actual next token and the ``top`` most likely stored ids."""
    cache = Cache.open(path)
    tok = cache_tokenizer(cache)
    r = read_row(cache, row)
    ids = r.input_ids.tolist()
    wanted = set(range(len(ids))[positions])
    views = [_position(r, j, tok, top) for j, t in enumerate(r.positions.tolist()) if t in wanted]
    return RowView(cache=str(path), row=row, shard=cache.shards[r.shard].file,
                   text=tok.decode(ids), tokens=len(ids), positions=tuple(views))


def _position(r: CacheRow, j: int, tok, top: int) -> PositionView:
    e = r.entries(j)
    ids, probs = r.ids[e], np.exp(r.logprobs[e].astype(np.float64))
    counts = r.counts[e] if r.counts is not None else None
    t = int(r.positions[j])
    nxt = int(r.next_ids[j])
    hit = np.flatnonzero(ids == nxt)
    alts = tuple(Alternative(int(ids[i]), tok.decode([int(ids[i])]), float(probs[i]),
                             None if counts is None else int(counts[i])) for i in range(min(top, len(ids))))
    return PositionView(position=t, context=tok.decode([int(r.input_ids[t])]), next_id=nxt,
                        next_text=tok.decode([nxt]), next_prob=float(np.exp(np.float64(r.label_logprob[j]))),
                        next_rank=int(hit[0]) + 1 if len(hit) else 0, top=alts, stored=len(ids),
                        rest_mass=float(r.rest_mass[j]), entropy=float(r.entropy[j]))


# ---------------------------------------------------------------------------------------------------
# Text.

_GREEN, _YELLOW, _RED, _DIM, _RESET = "\x1b[32m", "\x1b[33m", "\x1b[31m", "\x1b[2m", "\x1b[0m"


def _quoted(text: str) -> str:
    """A token's text with whitespace made visible."""
    return repr(text)[1:-1] if text else "∅"


def _printable(text: str) -> str:
    """The row's text for a terminal: control characters (an escape sequence in the corpus could move the
    cursor, clear the screen or retitle the window) shown as Python escapes; newlines and tabs kept."""
    return "".join(c if c in "\n\t" or c.isprintable() else repr(c)[1:-1] for c in text)


def _rank_colour(rank: int) -> str:
    return _GREEN if rank == 1 else _YELLOW if rank > 1 else _RED


def format_text(view: RowView, colour: bool = False) -> str:
    def paint(s: str, c: str) -> str:
        return f"{c}{s}{_RESET}" if colour else s

    lines = [f"{view.cache}  row {view.row}  ({view.shard}, {view.tokens} tokens)", "", _printable(view.text), "",
             f"{'pos':>5}  {'token':<14}{'next':<16}{'p(next)':>9}{'rank':>6}  teacher's top stored ids "
             f"(probability)   rest / entropy"]
    for p in view.positions:
        rank = str(p.next_rank) if p.next_rank else "-"
        alts = "  ".join(f"{a.text!r} {a.prob:.4f}" + (f" ×{a.count}" if a.count is not None else "")
                         for a in p.top)
        lines.append(f"{p.position:>5}  {_quoted(p.context)[:13]:<14}"
                     f"{paint(f'{_quoted(p.next_text)[:15]:<16}', _rank_colour(p.next_rank))}"
                     f"{p.next_prob:>9.4f}{rank:>6}  {alts}   "
                     f"{paint(f'{p.rest_mass:.4f} / {p.entropy:.2f}', _DIM)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# HTML.

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
pre.text { white-space: pre-wrap; background: #f6f6f6; padding: 1em; border-radius: 4px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { position: sticky; top: 0; background: #fff; }
code { background: #eee; padding: 0 3px; border-radius: 3px; white-space: pre; }
.top1 { background: #d8f5d0; } .stored { background: #fdf3c4; } .outside { background: #f9d3d3; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { display: inline-block; height: 8px; background: #6a9be0; vertical-align: middle; margin-right: 4px; }
"""


def format_html(view: RowView) -> str:
    """A self-contained page (inline CSS, no scripts, nothing fetched) of the row's view."""
    def code(s: str) -> str:
        return f"<code>{html.escape(_quoted(s))}</code>"

    rows = []
    for p in view.positions:
        cls = "top1" if p.next_rank == 1 else "stored" if p.next_rank else "outside"
        alts = "<br>".join(
            f'<span class="bar" style="width:{max(1, round(a.prob * 120))}px"></span>{code(a.text)} '
            f"{a.prob:.4f}" + (f" ×{a.count}" if a.count is not None else "") for a in p.top)
        rows.append(f'<tr class="{cls}"><td class="num">{p.position}</td><td>{code(p.context)}</td>'
                    f"<td>{code(p.next_text)}</td><td class=\"num\">{p.next_prob:.4f}</td>"
                    f"<td class=\"num\">{p.next_rank or '-'}</td><td>{alts}</td><td class=\"num\">{p.stored}</td>"
                    f"<td class=\"num\">{p.rest_mass:.4f}</td><td class=\"num\">{p.entropy:.2f}</td></tr>")
    title = f"{view.cache} row {view.row}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(view.shard)}, {view.tokens} tokens. CacheRow colour: <span class="top1">the actual next token is the
teacher's top id</span>, <span class="stored">stored lower down</span>, <span class="outside">outside the stored
set</span>. Probabilities are exp() of the cache's log-probs over the teacher's full vocabulary.</p>
<pre class="text">{html.escape(view.text)}</pre>
<table>
<thead><tr><th>pos</th><th>token</th><th>next</th><th>p(next)</th><th>rank</th><th>teacher's top stored ids</th>
<th>stored</th><th>rest mass</th><th>entropy (nats)</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
</body></html>
"""
