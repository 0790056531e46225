"""The demo teacher with a chat template: data/teacher's tokenizer has none (it was trained on code), and
chat data (teachercache build of `generate` output, import-api) needs one. Weights and config are linked,
not copied."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHER = ROOT / "data" / "teacher"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_chat_teacher(path) -> Path:
    """A teacher directory at ``path``: the demo teacher's model files and its tokenizer with CHAT_TEMPLATE."""
    from transformers import AutoTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if not (path / name).exists():
            os.symlink(DEMO_TEACHER / name, path / name)
    tok = AutoTokenizer.from_pretrained(DEMO_TEACHER)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path
