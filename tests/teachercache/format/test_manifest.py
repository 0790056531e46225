"""Manifest: JSON round trip, strict parsing with errors naming the field, path confinement, and the
tokenizer/config fingerprints on real transformers objects."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import random_batch, write_cache

from teachercache.errors import CacheFormatError, CacheIncompleteError, CachePathError, CacheVersionError
from teachercache.format import schema as S
from teachercache.format.manifest import (MANIFEST_NAME, config_fingerprint, read_manifest, resolve_in_cache,
                                          tokenizer_fingerprint)

LAYOUT = S.Layout(vocab_size=300, sampled=True, hidden_layers=(2,), hidden_width=3)


@pytest.fixture
def cache(tmp_path):
    rng = np.random.default_rng(0)
    manifest = write_cache(tmp_path / "c", [random_batch(rng, LAYOUT, [8, 8], k=None)], LAYOUT)
    return tmp_path / "c", manifest


def _edit(path, fn):
    raw = json.loads((path / MANIFEST_NAME).read_text())
    fn(raw)
    (path / MANIFEST_NAME).write_text(json.dumps(raw))


def test_round_trip(cache):
    path, manifest = cache
    assert read_manifest(path) == manifest
    raw = json.loads((path / MANIFEST_NAME).read_text())
    assert raw["format"] == "teachercache" and raw["format_version"] == S.FORMAT_VERSION == 3
    assert "format_version" not in raw["layout"]  # the version sits beside the layout, as in version 2
    assert raw["layout"]["vocab_size"] == 300 and raw["totals"]["rows"] == 2
    assert raw["shards"][0]["file"] == "shards/part-r000-00000.arrow"


@pytest.mark.parametrize("edit, error, problem", [
    (lambda r: r.pop("teacher"), CacheFormatError, "field teacher is missing"),
    (lambda r: r["targets"].pop("kind"), CacheFormatError, "targets: target kind|targets.kind"),
    (lambda r: r["targets"].update(kind="beam"), CacheFormatError, "beam"),
    (lambda r: r.update(surprise=1), CacheFormatError, "unknown fields"),
    (lambda r: r["shards"][0].update(rows="2"), CacheFormatError, r"shards\[0\].rows: expected int"),
    (lambda r: r["shards"][0].update(rows=-1), CacheFormatError, "negative"),
    (lambda r: r["totals"].update(rows=99), CacheFormatError, "totals"),
    (lambda r: r["layout"].update(vocab_size=0), CacheFormatError, "layout"),
    (lambda r: r.update(format_version=4), CacheVersionError, "format_version: 4, this reader reads versions 2 and 3.*"
                                                              "release that reads it"),
    (lambda r: r.update(format_version=1), CacheVersionError, "format_version: 1.*older teachercache.*rebuild"),
    (lambda r: r.update(format_version=2.0), CacheVersionError, "format_version: 2.0"),
    (lambda r: r.update(format="other"), CacheFormatError, "format"),
    (lambda r: r["shards"][0].update(file="../../etc/passwd"), CachePathError, "not a plain relative path"),
    (lambda r: r["shards"][0].update(file="/etc/passwd"), CachePathError, "not a plain relative path"),
])
def test_bad_manifests_are_refused_naming_the_field(cache, edit, error, problem):
    path, _ = cache
    _edit(path, edit)
    with pytest.raises(error, match=problem) as info:
        read_manifest(path)
    assert str(path / MANIFEST_NAME) in str(info.value)


def test_symlink_escaping_the_cache_is_refused(cache, tmp_path):
    path, _ = cache
    (path / "shards" / "evil").symlink_to(tmp_path)
    with pytest.raises(CachePathError, match="outside the cache"):
        resolve_in_cache(path, "shards/evil/x.arrow")


def test_missing_manifest_and_invalid_json(cache, tmp_path):
    path, _ = cache
    with pytest.raises(CacheIncompleteError, match="missing"):
        read_manifest(tmp_path)
    (path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CacheFormatError, match="not valid JSON"):
        read_manifest(path)


def _tokenizer(tmp_path, extra_tokens=()):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", *extra_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    out = tmp_path / f"tok{len(extra_tokens)}"
    fast.save_pretrained(out)
    return out


def test_tokenizer_fingerprint_survives_save_and_load_and_sees_changes(tmp_path):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(_tokenizer(tmp_path))
    b = AutoTokenizer.from_pretrained(_tokenizer(tmp_path))
    c = AutoTokenizer.from_pretrained(_tokenizer(tmp_path, extra_tokens=["<|pad|>"]))
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(c)
    b.add_special_tokens({"pad_token": "<|endoftext|>"})  # pad = eos changes no id: same fingerprint
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    a.add_special_tokens({"bos_token": "<|endoftext|>"})  # a BOS role changes the ids a text becomes
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)


def test_config_fingerprint_ignores_dtype_and_path_but_not_architecture():
    from transformers import LlamaConfig

    a = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    vocab_size=300)
    b = LlamaConfig.from_dict(a.to_dict())
    b._name_or_path = "/somewhere/else"
    b.torch_dtype = "bfloat16"
    c = LlamaConfig.from_dict({**a.to_dict(), "num_hidden_layers": 3})
    assert config_fingerprint(a) == config_fingerprint(b)
    assert config_fingerprint(a) != config_fingerprint(c)
