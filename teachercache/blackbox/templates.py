"""Prompt templates of `teachercache generate`: instruction following, in-context learning, chain of thought.

``instruction``: Alpaca style (``INSTRUCTION_TEMPLATE``); ``icl`` and ``cot``: demonstrations then the
query, each rendered with a demonstration template (``ICL_TEMPLATE``, ``COT_TEMPLATE`` or a user's
``str.format`` file) and cut before ``{output}`` / ``{rationale}``. ``split_rationale`` splits a cot answer
at the template's answer marker. docs/blackbox.md shows every template exactly (tests hold golden strings).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from teachercache.errors import TeachercacheError

TEMPLATES = ("instruction", "icl", "cot")
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ICL_TEMPLATE = "Input: {query}\nOutput: {output}"
COT_TEMPLATE = "Question: {query}\nReasoning: {rationale}\nAnswer: {output}"
DEMO_SEPARATOR = "\n\n"
FIELDS = ("query", "instruction", "input", "output", "rationale")


class TemplateError(TeachercacheError):
    """A template (built-in choice or --template-file) or a record that does not fit it."""


@dataclass(frozen=True)
class Example:
    """One record of the prompts or pool file."""

    key: str
    """The record's id (its ``id`` field, or its line number) as JSON text: unique within a file."""
    id: object
    """The id as written into the output (the ``id`` field as given, or the line number)."""
    instruction: str
    input: str = ""
    output: str = ""
    rationale: str = ""
    has_id: bool = False
    """Whether the id came from an ``id`` field (rather than the line number)."""

    @property
    def query(self) -> str:
        return self.instruction + ("\n" + self.input if self.input else "")

    def fields(self) -> dict:
        return {"query": self.query, "instruction": self.instruction, "input": self.input,
                "output": self.output, "rationale": self.rationale}


def render_instruction(example: Example) -> str:
    """The instruction-following prompt of ``example`` (see the module docstring)."""
    if example.input:
        return INSTRUCTION_INPUT_TEMPLATE.format(instruction=example.instruction, input=example.input)
    return INSTRUCTION_TEMPLATE.format(instruction=example.instruction)


@dataclass(frozen=True)
class DemoTemplate:
    """A demonstration template of icl or cot, checked once."""

    text: str
    kind: str
    """icl or cot."""

    def __post_init__(self):
        names = _field_names(self.text, self.kind)
        need = ("output",) if self.kind == "icl" else ("rationale", "output")
        for name in need:
            if names.count(name) != 1:
                raise TemplateError(f"{self.kind} template {self.text!r}: needs the field {{{name}}} exactly "
                                    f"once (fields: {', '.join('{' + f + '}' for f in FIELDS)})")
        if self.kind == "cot" and self.text.index("{rationale}") > self.text.index("{output}"):
            raise TemplateError(f"cot template {self.text!r}: {{rationale}} must come before {{output}}")
        if self.kind == "cot" and not self.answer_marker:
            raise TemplateError(f"cot template {self.text!r}: put a marker such as 'Answer:' between "
                                "{rationale} and {output}; the generated text is split there")

    @property
    def cut_field(self) -> str:
        return "{output}" if self.kind == "icl" else "{rationale}"

    @property
    def answer_marker(self) -> str:
        """cot: the text between {rationale} and {output}, stripped; '' for icl."""
        if self.kind != "cot":
            return ""
        start = self.text.index("{rationale}") + len("{rationale}")
        return self.text[start:self.text.index("{output}")].strip()

    def demonstration(self, example: Example) -> str:
        return self.text.format(**example.fields())

    def query(self, example: Example) -> str:
        head = self.text[: self.text.index(self.cut_field)].rstrip(" ")
        return head.format(**example.fields())

    def render(self, demos: list[Example], query: Example) -> str:
        """k demonstrations then the query, separated by DEMO_SEPARATOR."""
        return DEMO_SEPARATOR.join([self.demonstration(d) for d in demos] + [self.query(query)])


def _field_names(text: str, kind: str) -> list[str]:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as e:
        raise TemplateError(f"{kind} template {text!r}: not a str.format template ({e}); double literal "
                            "braces: {{ }}") from None
    unknown = [n for n in names if n not in FIELDS]
    if unknown:
        raise TemplateError(f"{kind} template {text!r}: unknown fields {unknown}; use "
                            f"{', '.join('{' + f + '}' for f in FIELDS)}")
    return names


def demo_template(kind: str, text: str | None = None) -> DemoTemplate:
    """The built-in demonstration template of ``kind`` (icl, cot), or ``text`` checked against it."""
    if kind not in ("icl", "cot"):
        raise TemplateError(f"--template-file is for icl and cot templates, not {kind!r}")
    return DemoTemplate(text if text is not None else (ICL_TEMPLATE if kind == "icl" else COT_TEMPLATE), kind)


def split_rationale(text: str, marker: str) -> tuple[str, str | None]:
    """(rationale, answer) of a generated chain of thought: split at the first ``marker``, both stripped;
    answer None when the marker is not there."""
    head, found, tail = text.partition(marker)
    if not found:
        return text.strip(), None
    return head.strip(), tail.strip()
