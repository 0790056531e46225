"""docs/ERRORS.md stays true: some of its entries are run again (the quick ones) and must give the same
exit code and message; no entry of the page may be a traceback."""

from __future__ import annotations

import fcntl
import json
import sys
from pathlib import Path

import pytest

from teachercache.format import schema as S

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from errors_catalogue import ENTRIES, PAGE, _cell, parse_page, prepare_light, run_entry  # noqa: E402

CHECKED = [("build", "another build is writing into --out"), ("verify", "CACHE: a cache from a newer format version"),
           ("train", "--cache: a cache from a newer format version")]


def test_the_page_lists_every_entry_and_no_traceback():
    page = parse_page(PAGE.read_text())
    assert set(page) == {(s, what) for s, what, _ in ENTRIES}
    assert not [key for key, (_, message) in page.items() if "TRACEBACK" in message]
    assert all(code in (0, 1, 2) for code, _ in page.values())


@pytest.mark.parametrize("key", CHECKED, ids=[" ".join(k) for k in CHECKED])
def test_entries_still_give_the_catalogued_message(tmp_path, key):
    prepare_light(tmp_path)
    (tmp_path / "newer").mkdir()  # the manifest's version is checked before anything else in it
    (tmp_path / "newer" / "manifest.json").write_text(json.dumps({"format": "teachercache",
                                                                         "format_version": S.FORMAT_VERSION + 1}))
    args = {(s, what): a for s, what, a in ENTRIES}[key]
    with open(tmp_path / "locked" / "state" / "rank-000.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, message = run_entry(args, tmp_path)
    assert (code, _cell(message)) == parse_page(PAGE.read_text())[key]
