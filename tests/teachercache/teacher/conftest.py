"""Fixtures of the teacher-pass tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A tiny Llama (2 layers, width 32) over the demo tokenizer's 8192 ids, saved as a model directory."""
    path = tmp_path_factory.mktemp("tiny-teacher")
    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "teacher")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path
