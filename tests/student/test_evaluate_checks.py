"""`teachercache eval` refuses, before any forward pass, what would give a traceback or a number that means
nothing: another tokenizer than the cache's, a narrower output, rows longer than the model's positions, a
cache with no target positions, and option values out of range. Real tiny models and real caches of the
demo teacher; the CLI is checked through its `Error:` lines and exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from teachercache.student.evaluate import EvalError, evaluate_model
from teachercache.cli import main
from teachercache.format import schema as S
from teachercache.format.cache import Cache, CacheWriter
from teachercache.format.manifest import TargetSpec, tokenizer_fingerprint
from teachercache.teacher.build import BuildOptions, build_cache
from teachercache.teacher.corpus import DataOptions

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "data" / "teacher"
VALID = ROOT / "data" / "corpus" / "valid.parquet"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The demo teacher over one held-out document: rows of 64 tokens, top-16 targets."""
    out = tmp_path_factory.mktemp("eval") / "cache"
    build_cache(BuildOptions(teacher=str(TEACHER), out=str(out), batch_size=8, progress=False,
                             targets=TargetSpec(kind="topk", k=16),
                             data=DataOptions(paths=(str(VALID),), seq_len=64, max_docs=1)))
    return out


@pytest.fixture(scope="module")
def renamed_teacher(tmp_path_factory) -> Path:
    """The demo teacher under another tokenizer of the same size: every id but 0 (<|endoftext|>) permuted in
    tokenizer.json and the (tied) embedding rows permuted alike, so on text it is the same model, while the
    cache's ids name other tokens for it."""
    out = tmp_path_factory.mktemp("renamed") / "model"
    perm = np.concatenate([[0], 1 + np.random.default_rng(0).permutation(8191)])   # old id -> new id
    spec = json.loads((TEACHER / "tokenizer.json").read_text())
    spec["model"]["vocab"] = {token: int(perm[i]) for token, i in spec["model"]["vocab"].items()}
    model = AutoModelForCausalLM.from_pretrained(TEACHER)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[torch.from_numpy(perm)] = emb.clone()
    model.save_pretrained(out)
    (out / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(TEACHER / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def _tiny(out: Path, **config) -> Path:
    """A 1-layer Llama of fresh weights with the demo tokenizer saved beside it."""
    values = dict(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**values, **config})).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(TEACHER / name, out / name)
    return out


def _eval(*args) -> tuple[int, str]:
    """(exit code, output) of `teachercache eval ARGS`; the output is the `Error:` line when there is one."""
    result = CliRunner().invoke(main, ["eval", *map(str, args)])
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, NameError))
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    return result.exit_code, errors[0] if errors else result.output


def test_another_tokenizer_of_the_same_size_is_refused_on_a_cache_naming_both_fingerprints(cache, renamed_teacher):
    tok = AutoTokenizer.from_pretrained(renamed_teacher)
    model = AutoModelForCausalLM.from_pretrained(renamed_teacher)
    assert len(tok) == 8192 == Cache.open(cache).layout.vocab_size
    got, want = tokenizer_fingerprint(tok), Cache.open(cache).manifest.tokenizer.fingerprint
    assert got != want
    with pytest.raises(EvalError, match=f"fingerprint {got[:12]}.*{want[:12]}.*text file"):
        evaluate_model(model, cache, tok)
    code, error = _eval("--model", renamed_teacher, "--data", cache)
    assert code == 1 and error.startswith(f"Error: {cache}: the model's tokenizer"), error
    assert got[:12] in error and want[:12] in error and "tokenizer.fingerprint" in error
    # the same model read with its own tokenizer: text data has nothing to compare, and scores as the teacher
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER)
    own = evaluate_model(model, VALID, tok, seq_len=64, max_rows=4)
    reference = evaluate_model(teacher, VALID, AutoTokenizer.from_pretrained(TEACHER), seq_len=64, max_rows=4)
    assert own.perplexity == pytest.approx(reference.perplexity, rel=1e-4) and reference.perplexity < 1000
    on_cache = evaluate_model(teacher, cache, AutoTokenizer.from_pretrained(TEACHER))
    assert on_cache.perplexity < 200 and on_cache.teacher_agreement > 0.9   # 82 and 0.99 here


def test_an_output_narrower_than_the_stored_ids_is_refused(cache, tmp_path):
    narrow = _tiny(tmp_path / "narrow", vocab_size=4096)   # the cache's tokenizer, half its output columns
    model, tok = AutoModelForCausalLM.from_pretrained(narrow), AutoTokenizer.from_pretrained(narrow)
    with pytest.raises(EvalError, match="stored ids go up to 8191, but the model's output has only 4096 columns"):
        evaluate_model(model, cache, tok)


def test_rows_longer_than_the_models_positions_are_refused(cache, tmp_path):
    short = _tiny(tmp_path / "short", max_position_embeddings=32)
    model, tok = AutoModelForCausalLM.from_pretrained(short), AutoTokenizer.from_pretrained(short)
    with pytest.raises(EvalError, match="--seq-len 64 exceeds the model's max_position_embeddings 32; use --seq-len"):
        evaluate_model(model, VALID, tok, seq_len=64)
    with pytest.raises(EvalError, match="rows of up to 64 tokens .manifest field data.seq_len. exceed the model's "
                                        "max_position_embeddings 32"):
        evaluate_model(model, cache, tok)
    code, error = _eval("--model", short, "--data", VALID, "--seq-len", 64)
    assert (code, error) == (1, "Error: --seq-len 64 exceeds the model's max_position_embeddings 32; "
                                "use --seq-len 32 or less")
    assert evaluate_model(model, VALID, tok, seq_len=32, max_rows=2).positions == 62   # at the limit: fine


@pytest.mark.parametrize("flag, value, field", [("--batch-size", 0, "batch_size"), ("--max-rows", 0, "max_rows"),
                                                ("--seq-len", 1, "seq_len"), ("--batch-size", -3, "batch_size")])
def test_options_out_of_range_are_refused_by_the_cli_and_the_api(cache, tmp_path, flag, value, field):
    code, error = _eval("--model", TEACHER, "--data", VALID, flag, value)
    assert code == 2 and error.startswith(f"Error: Invalid value for '{flag}': {value} is not in the range"), error
    model, tok = AutoModelForCausalLM.from_pretrained(TEACHER), AutoTokenizer.from_pretrained(TEACHER)
    kwargs = {"batch_size": 8, "seq_len": 64, "max_rows": 2, field: value}
    with pytest.raises(EvalError, match=rf"eval: {field} \({flag}\) must be an integer of at least"):
        evaluate_model(model, cache, tok, **kwargs)


def test_the_api_refuses_what_is_not_an_integer(cache):
    model, tok = AutoModelForCausalLM.from_pretrained(TEACHER), AutoTokenizer.from_pretrained(TEACHER)
    for kwargs in ({"batch_size": 2.5}, {"batch_size": True}, {"max_rows": "3"}, {"seq_len": None}):
        with pytest.raises(EvalError, match="must be an integer of at least"):
            evaluate_model(model, cache, tok, **kwargs)


def test_a_cache_without_rows_is_a_clear_error(cache, tmp_path):
    empty = tmp_path / "empty"
    manifest = Cache.open(cache).manifest
    with CacheWriter(empty, S.Layout(vocab_size=manifest.layout.vocab_size)) as writer:
        writer.finish(targets=manifest.targets, teacher=manifest.teacher, tokenizer=manifest.tokenizer,
                      data=manifest.data)
    shutil.copytree(cache / "tokenizer", empty / "tokenizer")
    assert Cache.open(empty).manifest.totals.rows == 0
    model, tok = AutoModelForCausalLM.from_pretrained(TEACHER), AutoTokenizer.from_pretrained(TEACHER)
    with pytest.raises(EvalError, match="nothing to evaluate: the cache holds 0 rows and 0 target positions"):
        evaluate_model(model, empty, tok)
    code, error = _eval("--model", TEACHER, "--data", empty)
    assert code == 1 and error.startswith(f"Error: {empty}: nothing to evaluate"), error
