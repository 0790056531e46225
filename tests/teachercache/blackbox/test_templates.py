"""Templates of `teachercache generate` render exactly as documented (golden strings)."""

from __future__ import annotations

import pytest

from teachercache.blackbox.generate import draw_demos
from teachercache.blackbox.templates import (DemoTemplate, Example, TemplateError, demo_template, render_instruction,
                                             split_rationale)


def ex(key, instruction, input="", output="", rationale="", has_id=False):
    return Example(key=str(key), id=key, instruction=instruction, input=input, output=output, rationale=rationale,
                   has_id=has_id)


def test_instruction_template_golden():
    assert render_instruction(ex(1, "Reverse a list.")) == "### Instruction:\nReverse a list.\n\n### Response:\n"
    assert render_instruction(ex(1, "Sum these.", "1 2 3")) == (
        "### Instruction:\nSum these.\n\n### Input:\n1 2 3\n\n### Response:\n")


def test_icl_template_golden():
    demos = [ex(1, "2+2", output="4"), ex(2, "Capital of France", "one word", output="Paris")]
    assert demo_template("icl").render(demos, ex(9, "3+5")) == (
        "Input: 2+2\nOutput: 4\n\n"
        "Input: Capital of France\none word\nOutput: Paris\n\n"
        "Input: 3+5\nOutput:")


def test_cot_template_golden_and_split():
    t = demo_template("cot")
    demo = ex(1, "Tom has 2 apples and buys 3. How many?", output="5", rationale="2 + 3 = 5.")
    assert t.render([demo], ex(2, "Ann has 4 pens and loses 1. How many?")) == (
        "Question: Tom has 2 apples and buys 3. How many?\nReasoning: 2 + 3 = 5.\nAnswer: 5\n\n"
        "Question: Ann has 4 pens and loses 1. How many?\nReasoning:")
    assert t.answer_marker == "Answer:"
    assert split_rationale(" 4 - 1 = 3.\nAnswer: 3 \nQuestion: x", "Answer:") == ("4 - 1 = 3.", "3 \nQuestion: x".strip())
    assert split_rationale(" no marker here ", "Answer:") == ("no marker here", None)
    assert t.render([], ex(3, "Why?")) == "Question: Why?\nReasoning:"   # zero-shot


def test_user_template_file_text():
    t = demo_template("icl", "Q: {instruction} [{input}]\nA: {output}")
    assert t.render([ex(1, "a", "b", output="c")], ex(2, "d")) == "Q: a [b]\nA: c\n\nQ: d []\nA:"
    cot = demo_template("cot", "<q>{query}</q> {{think}} {rationale} => so: {output}")
    assert cot.answer_marker == "=> so:"
    assert cot.query(ex(1, "x")) == "<q>x</q> {think}"


@pytest.mark.parametrize("kind,text,words", [
    ("icl", "Input: {query}", "{output}"),
    ("icl", "Input: {query} {colour}\nOutput: {output}", "unknown fields"),
    ("cot", "Answer: {output} Because: {rationale}", "before"),
    ("cot", "Q: {query} {rationale}{output}", "marker"),
    ("icl", "Input: {query\nOutput: {output}", "str.format"),
])
def test_bad_templates_are_refused(kind, text, words):
    with pytest.raises(TemplateError, match=words):
        DemoTemplate(text, kind)


def test_demonstrations_seeded_per_prompt_never_the_query():
    pool = [ex(i, f"q{i}", output=f"a{i}") for i in range(1, 9)]
    query = ex("q3", "q3")                      # same text as pool record 3
    for seed in range(20):
        demos = draw_demos(pool, query, 7, seed)
        assert "q3" not in [d.instruction for d in demos] and len(demos) == 7
    assert draw_demos(pool, query, 3, 5) == draw_demos(pool, query, 3, 5)
    assert any(draw_demos(pool, query, 3, s) != draw_demos(pool, query, 3, 5) for s in range(6, 12))
    assert draw_demos(pool, query, 8, 0) is None                       # pool too small without the query
    same_id = ex(4, "something else", has_id=True)
    pool_ids = [ex(i, f"q{i}", output="a", has_id=True) for i in range(1, 9)]
    assert all(d.id != 4 for s in range(10) for d in draw_demos(pool_ids, same_id, 7, s))
