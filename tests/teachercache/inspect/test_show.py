"""`teachercache show` on a real cache (the demo teacher over the held-out corpus): the text is the
tokenizer's decoding of the row's tokens and every probability shown is exp() of the cache's log-probs,
both checked against the pyarrow-only decoder of docs/FORMAT.md."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from teachercache.cli import main
from teachercache.errors import TeachercacheError
from teachercache.inspect.show import format_html, format_text, parse_positions, show_row

ROOT = Path(__file__).resolve().parents[3]


def test_show_prints_the_rows_text_and_the_caches_probabilities(demo_cache, doc_rows):
    rows = doc_rows(demo_cache)
    n = 9  # in the second record batch (batches of 8 rows): read_row must find it there
    ref = rows[n]
    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "teacher")
    view = show_row(demo_cache, n, top=5)
    assert view.text == tok.decode(ref["input_ids"]) and len(view.text) > 100
    assert [p.position for p in view.positions] == ref["target_positions"]
    for p, (ids, lps, _), label in zip(view.positions, ref["targets"], ref["label_logprob"]):
        assert p.next_id == ref["input_ids"][p.position + 1]
        assert p.next_text == tok.decode([p.next_id])
        assert p.next_prob == pytest.approx(np.exp(label), abs=1e-6)
        assert [a.token_id for a in p.top] == ids[:5]
        np.testing.assert_allclose([a.prob for a in p.top], np.exp(lps[:5]), rtol=1e-6)
        assert p.next_rank == (ids.index(p.next_id) + 1 if p.next_id in ids else 0)

    result = CliRunner().invoke(main, ["show", str(demo_cache), "--row", str(n), "--positions", "10:14",
                                       "--top", "3", "--html", str(demo_cache.parent / "row.html")])
    assert result.exit_code == 0, result.output
    assert tok.decode(ref["input_ids"]) in result.output
    listed = [line for line in result.output.splitlines() if re.match(r"\s+1[0-3]\s", line)]
    assert len(listed) == 4 and "\x1b[" not in result.output  # CliRunner is not a terminal: no colour
    j = ref["target_positions"].index(10)
    first = listed[0]
    assert f"{np.exp(ref['label_logprob'][j]):.4f}" in first
    for lp in ref["targets"][j][1][:3]:
        assert f"{np.exp(lp):.4f}" in first
    page = (demo_cache.parent / "row.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    assert page.count("<tr class=") == 4 and f"{np.exp(ref['targets'][j][1][0]):.4f}" in page


def test_colour_and_positions(demo_cache):
    view = show_row(demo_cache, 0, parse_positions("5:"), top=2)
    assert view.positions[0].position == 5 and all(p.position >= 5 for p in view.positions)
    coloured = format_text(view, colour=True)
    assert "\x1b[32m" in coloured or "\x1b[33m" in coloured or "\x1b[31m" in coloured
    assert "<table>" in format_html(view)
    with pytest.raises(TeachercacheError, match="--positions"):
        parse_positions("5-9")
    result = CliRunner().invoke(main, ["show", str(demo_cache), "--row", "1000"])
    assert result.exit_code == 1 and "row 1000 does not exist" in result.output


def test_plain_text_show_does_not_pass_terminal_escapes_through(tmp_path):
    # a corpus line holding escape sequences (clear the screen, retitle the window): shown as escapes
    import json as _json
    import subprocess
    import sys

    from teachercache.teacher.build import BuildOptions, build_cache
    from teachercache.teacher.corpus import DataOptions

    data = tmp_path / "evil.jsonl"
    data.write_text(_json.dumps({"text": "print('hi')\x1b[2J\x1b]0;pwned\x07 and more text " * 8}) + "\n")
    cache = tmp_path / "cache"
    build_cache(BuildOptions(teacher=str(ROOT / "data" / "teacher"), out=str(cache), progress=False, batch_size=4,
                             data=DataOptions(paths=(str(data),), seq_len=32)))
    proc = subprocess.run([sys.executable, "-m", "teachercache", "show", str(cache), "--row", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert "\\x1b[2J" in proc.stdout
