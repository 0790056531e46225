"""Every `teachercache COMMAND --option` written in README.md and docs/ names a real command option."""

from __future__ import annotations

import re
from pathlib import Path

from teachercache.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_documented_options_exist():
    unknown = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            match = re.search(r"teachercache\s+([a-z][a-z-]*)\s+(.*)", line)
            if not match or match.group(1) not in main.commands:
                continue
            command = main.commands[match.group(1)]
            options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
            unknown += [f"{path.name}: {match.group(1)} {flag}"
                        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", match.group(2)) if flag not in options]
    assert unknown == []
    assert {"build", "train", "eval", "demo", "inspect", "verify"} <= set(main.commands)
