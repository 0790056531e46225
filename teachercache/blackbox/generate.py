"""`teachercache generate`: a teacher writes answers to prompts, as chat JSON Lines that `build` reads.

Prompts (and a pool of demonstrations for icl/cot) go through teachercache.blackbox.templates, in batches
through Hugging Face ``generate``; each prompt is sampled with its own generator seeded from (seed, id)
(``PerPromptSampler``), so its answer does not depend on its batch. The output is appended to and fsynced
record by record, so rerunning resumes; every prompt is accounted for (answered, skipped, failed by
reason) in ``GenerateSummary``. docs/blackbox.md has the record shape, seeding and resume rules.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from teachercache.blackbox.templates import (TEMPLATES, DemoTemplate, Example, demo_template, render_instruction,
                                             split_rationale)
from teachercache.errors import TeachercacheError
from teachercache.runtime import load_causal_lm, resolve_device, resolve_dtype


class GenerateError(TeachercacheError):
    """A generation run that cannot start as asked (options, files)."""


@dataclass(frozen=True)
class GenerateOptions:
    """Everything `teachercache generate` needs."""

    teacher: str
    """Hub id or local directory of the teacher (a causal LM)."""
    prompts: str
    """JSON Lines of prompt records (instruction, optional input, optional id)."""
    out: str
    """Output chat JSON Lines; appended to (resume)."""
    template: str = "instruction"
    """instruction | icl | cot (teachercache.blackbox.templates)."""
    pool: str | None = None
    """icl/cot: JSON Lines of demonstrations (instruction, input, output, rationale)."""
    shots: int = 3
    """icl/cot: demonstrations per prompt (cot may use 0: zero-shot)."""
    template_file: str | None = None
    """icl/cot: a demonstration template file instead of the built-in one."""
    max_new_tokens: int = 256
    """Most tokens generated per prompt."""
    temperature: float = 0.7
    """Sampling temperature; 0: greedy."""
    top_p: float = 0.95
    """Nucleus sampling: draw from the smallest set of tokens holding this much probability."""
    seed: int = 0
    """Base seed; each prompt's sampler and demonstrations are seeded from (seed, id)."""
    stop: tuple[str, ...] = ()
    """Stop strings: the answer is cut at the first occurrence of any (after generation)."""
    batch_size: int = 8
    """Prompts per generate call."""
    prompt_format: str = "auto"
    """auto (chat template when the tokenizer has one) | chat | plain."""
    record_prompt: str = "full"
    """full: the user message is the prompt the teacher saw; query: just the prompt record's query."""
    device: str = "auto"
    """auto (cuda if available) | cuda | cpu."""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32."""
    trust_remote_code: bool = False
    """Let transformers run the teacher repository's own code (off unless asked for)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise GenerateError(f"--template {self.template!r}: choose one of {TEMPLATES}")
        if self.template == "instruction" and (self.pool or self.template_file):
            raise GenerateError("--pool and --template-file are for --template icl or cot")
        if self.template != "instruction" and self.shots > 0 and not self.pool:
            raise GenerateError(f"--template {self.template} with --shots {self.shots} needs --pool FILE of "
                                "demonstrations")
        if self.template == "icl" and self.shots < 1:
            raise GenerateError("--template icl needs --shots 1 or more")
        for name, ok in (("--max-new-tokens", self.max_new_tokens >= 1), ("--batch-size", self.batch_size >= 1),
                         ("--temperature", self.temperature >= 0), ("--top-p", 0 < self.top_p <= 1),
                         ("--shots", self.shots >= 0)):
            if not ok:
                raise GenerateError(f"{name}: out of range")
        if self.prompt_format not in ("auto", "chat", "plain"):
            raise GenerateError(f"--prompt-format {self.prompt_format!r}: choose auto, chat or plain")
        if self.record_prompt not in ("full", "query"):
            raise GenerateError(f"--record-prompt {self.record_prompt!r}: choose full or query")


@dataclass
class GenerateSummary:
    out: Path
    total: int = 0
    """Prompt records in the prompts file."""
    answered: int = 0
    """Answered by this run."""
    skipped_done: int = 0
    """Already in the output (earlier run)."""
    failed: Counter = field(default_factory=Counter)
    """reason -> prompts."""
    failed_ids: dict = field(default_factory=dict)
    """reason -> ids of the failed prompts (the first 20)."""
    no_answer_marker: int = 0
    """cot: answered, but without the answer marker (written with "answer": null)."""
    rewritten_partial_line: bool = False
    """The output ended in a partial line (a killed run), which was cut off."""

    def fail(self, reason: str, key) -> None:
        self.failed[reason] += 1
        ids = self.failed_ids.setdefault(reason, [])
        if len(ids) < 20:
            ids.append(key)

    def lines(self) -> list[str]:
        out = [f"{self.out}: {self.total} prompts: {self.answered} answered, {self.skipped_done} already done, "
               f"{sum(self.failed.values())} failed"]
        out += [f"  failed ({reason}): {n}, ids {self.failed_ids[reason]}" for reason, n in sorted(self.failed.items())]
        if self.no_answer_marker:
            out.append(f"  {self.no_answer_marker} chain(s) of thought without the answer marker (answer null)")
        if self.rewritten_partial_line:
            out.append("  a partial last line of an interrupted run was cut off and its prompt answered again")
        return out


# ---------------------------------------------------------------------------------------------------
# Reading prompts, pool and the output so far.


def read_examples(path: str | os.PathLike, summary: GenerateSummary | None, need: tuple[str, ...] = ()):
    """Examples of a JSON Lines file. For the prompts file (``summary`` given) a bad record is a failure
    ``invalid record`` (counted); for the pool (``summary`` None) it is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"{path}: no such file")
    examples, seen = [], set()
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                for name in ("instruction",) + need:
                    if not isinstance(rec.get(name), str):
                        raise ValueError(f"field {name!r} missing or not a string")
                if not isinstance(rec.get("input", ""), str):
                    raise ValueError("field 'input' is not a string")
                has_id = "id" in rec
                rid = rec["id"] if has_id else line_no
                if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                    raise ValueError("field 'id' must be a string or an integer")
            except (UnicodeDecodeError, ValueError) as e:
                if summary is None:
                    raise GenerateError(f"{path}:{line_no}: {e} (pool records need instruction, output"
                                        f"{', rationale' if 'rationale' in need else ''})") from None
                summary.total += 1
                summary.fail("invalid record", line_no)
                continue
            key = json.dumps(rid)
            if key in seen:
                raise GenerateError(f"{path}:{line_no}: id {rid!r} appears twice; ids must be unique")
            seen.add(key)
            examples.append(Example(key=key, id=rid, instruction=rec["instruction"], input=rec.get("input", ""),
                                    output=rec.get("output", ""), rationale=rec.get("rationale", ""),
                                    has_id=has_id))
            if summary is not None:
                summary.total += 1
    return examples


def done_ids(out: Path, summary: GenerateSummary) -> set[str]:
    """Ids (as JSON text) already in the output; a partial last line is cut off (the file is truncated)."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(out, "r+b") as f:
            f.truncate(cut)
            os.fsync(f.fileno())
        data = data[:cut]
        summary.rewritten_partial_line = True
    done = set()
    for line_no, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done.add(json.dumps(rec["id"]))
        except (ValueError, KeyError, TypeError):
            raise GenerateError(f"{out}:{line_no}: not a record of teachercache generate (a JSON object with "
                                "an id); give another --out or repair the file") from None
    return done


def draw_demos(pool: list[Example], query: Example, shots: int, seed: int) -> list[Example] | None:
    """``shots`` demonstrations for ``query``, seeded by (seed, id); None when the pool is too small."""
    candidates = [p for p in pool if p.query != query.query and not (p.has_id and query.has_id and p.id == query.id)]
    if len(candidates) < shots:
        return None
    return random.Random(f"{seed}/{query.key}/shots").sample(candidates, shots)


# ---------------------------------------------------------------------------------------------------
# Sampling, seeded per prompt.


def prompt_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}/sample".encode()).digest()[:8], "little") >> 1


class PerPromptSampler:
    """A logits processor: draws each row's next token with that row's own generator (temperature, top-p)
    and returns scores that are 0 at the drawn token and -inf elsewhere, for generate's greedy step."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        if self.temperature == 0:
            chosen = scores.argmax(-1)
        else:
            probs = torch.softmax(scores / self.temperature, -1)           # (B, V)
            p, order = probs.sort(-1, descending=True)
            cum = p.cumsum(-1)
            p = torch.where(cum - p < self.top_p, p, torch.zeros_like(p))  # the nucleus; the first always
            cum = p.cumsum(-1)
            u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
            idx = torch.searchsorted(cum.double(), (u * cum[:, -1].double())[:, None]).clamp(max=p.shape[1] - 1)
            chosen = order.gather(1, idx)[:, 0]
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(chosen)), chosen] = 0.0
        return out


# ---------------------------------------------------------------------------------------------------
# The run.


def _load(options: GenerateOptions):
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    tok, model = load_causal_lm(options.teacher, dtype, options.trust_remote_code, GenerateError)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model.to(device).eval(), device


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    """The token ids the teacher is given for ``prompt``: a user message in the chat template (with the
    generation prompt), or the plain text."""
    if chat:
        out = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                      add_generation_prompt=True, return_dict=False)
        return list(out["input_ids"] if isinstance(out, dict) else out)
    return tok(prompt)["input_ids"]


def finish_answer(text: str, stop: tuple[str, ...]) -> str:
    """Cut ``text`` at the first occurrence of any stop string, strip surrounding whitespace."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def _record(options: GenerateOptions, ex: Example, prompt: str, demos: list[Example], text: str,
            marker: str) -> dict:
    rec = {"id": ex.id, "template": options.template, "query": ex.query}
    if options.template != "instruction":
        rec["shots"] = [d.id for d in demos]
    rec["messages"] = [{"role": "user", "content": prompt if options.record_prompt == "full" else ex.query},
                       {"role": "assistant", "content": text}]
    if options.template == "cot":
        rec["rationale"], rec["answer"] = split_rationale(text, marker)
    return rec


def generate(options: GenerateOptions) -> GenerateSummary:
    """Answer every prompt of ``options.prompts`` not yet in ``options.out``; returns the summary."""
    out = Path(options.out)
    summary = GenerateSummary(out=out)
    examples = read_examples(options.prompts, summary)
    template: DemoTemplate | None = None
    pool: list[Example] = []
    if options.template != "instruction":
        text = None
        if options.template_file:
            try:
                text = Path(options.template_file).read_text(encoding="utf-8").rstrip("\n")
            except OSError as e:
                raise GenerateError(f"--template-file {options.template_file}: cannot be read ({e})") from None
        template = demo_template(options.template, text)
        if options.shots:
            pool = read_examples(options.pool, None, ("output",) + (("rationale",) if options.template == "cot" else ()))
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out, summary)
    todo = []
    for ex in examples:
        if ex.key in done:
            summary.skipped_done += 1
            continue
        demos = draw_demos(pool, ex, options.shots, options.seed) if template is not None and options.shots else []
        if demos is None:
            summary.fail("pool too small", ex.id)
            continue
        prompt = render_instruction(ex) if template is None else template.render(demos, ex)
        todo.append((ex, demos, prompt))
    if todo:
        _run(options, todo, summary, template.answer_marker if template is not None else "")
    return summary


def _run(options: GenerateOptions, todo: list, summary: GenerateSummary, marker: str) -> None:
    from transformers import GenerationConfig, LogitsProcessorList

    tok, model, device = _load(options)
    chat = options.prompt_format == "chat" or (options.prompt_format == "auto" and bool(tok.chat_template))
    if chat and not tok.chat_template:
        raise GenerateError(f"--prompt-format chat: the tokenizer of {options.teacher} has no chat_template")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    config = GenerationConfig(max_new_tokens=options.max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    encoded = []
    for ex, demos, prompt in todo:
        ids = prompt_ids(tok, prompt, chat)
        if max_pos is not None and len(ids) + options.max_new_tokens > max_pos:
            summary.fail("prompt too long", ex.id)
        else:
            encoded.append((ex, demos, prompt, ids))
    bar = None
    if options.progress:
        from tqdm import tqdm
        bar = tqdm(total=len(encoded), desc="generate", unit="prompt", dynamic_ncols=True)
    with open(options.out, "ab") as f:
        for start in range(0, len(encoded), options.batch_size):
            chunk = encoded[start:start + options.batch_size]
            width = max(len(c[3]) for c in chunk)
            input_ids = torch.tensor([[tok.pad_token_id] * (width - len(c[3])) + c[3] for c in chunk], device=device)
            attention = torch.tensor([[0] * (width - len(c[3])) + [1] * len(c[3]) for c in chunk], device=device)
            gens = [torch.Generator().manual_seed(prompt_seed(options.seed, c[0].key)) for c in chunk]
            sampler = PerPromptSampler(gens, options.temperature, options.top_p)
            with torch.no_grad():
                seqs = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                                      logits_processor=LogitsProcessorList([sampler]))
            for (ex, demos, prompt, _), new in zip(chunk, seqs[:, width:].tolist()):
                if tok.eos_token_id in new:
                    new = new[:new.index(tok.eos_token_id)]
                text = finish_answer(tok.decode(new, skip_special_tokens=True), options.stop)
                if not text:
                    summary.fail("empty answer", ex.id)
                    continue
                rec = _record(options, ex, prompt, demos, text, marker)
                if options.template == "cot" and rec["answer"] is None:
                    summary.no_answer_marker += 1
                f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                summary.answered += 1
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
