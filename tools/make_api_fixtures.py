"""Write tests/fixtures/openai_chat_logprobs*.jsonl: OpenAI chat completions with logprobs, in the documented
shape (see teachercache/interop/openai_chat.py), whose tokens are the demo tokenizer's (data/teacher).

    python tools/make_api_fixtures.py

openai_chat_logprobs.jsonl: 3 records, every token maps (one alternative per answer is a lone UTF-8 lead
byte given only by ``bytes``, one has ``bytes: null``). openai_chat_logprobs_unmapped.jsonl: the same with
some alternatives (and one chosen token) from another tokenizer's vocabulary (CJK words, emoji).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures"
CONVERSATIONS = [
    ([{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}],
     "def add(a, b):\n    return a + b"),
    ([{"role": "user", "content": "Import the os module."}], "import os"),
    ([{"role": "user", "content": "Print hello."}], "print('hello')"),
]


def entry(tok, tid: int, logprob: float, null_bytes: bool = False) -> dict:
    data = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(tid)]).encode("utf-8")
    return {"token": data.decode("utf-8"), "logprob": logprob, "bytes": None if null_bytes else list(data)}


def record(tok, rng, messages, answer: str, foreign: bool) -> dict:
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    content = []
    for i, tid in enumerate(ids):
        lps = np.log(np.sort(rng.dirichlet(np.full(7, 0.5)))[::-1][:5]).round(4)   # 5 best of 7: mass < 1
        others = [int(x) for x in rng.choice(np.setdiff1d(np.arange(300, len(tok)), [tid]), 3, replace=False)]
        alts = [entry(tok, tid, float(lps[0]))] + [entry(tok, o, float(lp), null_bytes=(i == 1 and j == 0))
                                                    for j, (o, lp) in enumerate(zip(others, lps[1:4]))]
        if i == 0:   # a lone UTF-8 lead byte: OpenAI writes such tokens as "bytes:\xe2"; only `bytes` says what it is
            alts.append({"token": "bytes:\\xe2", "logprob": float(lps[4]), "bytes": [0xE2]})
        if foreign and i % 2 == 0:
            alts.append({"token": "你好", "logprob": round(float(lps[4]) - 1, 4), "bytes": list("你好".encode())})
        if foreign and i == 1:
            alts.append({"token": "é", "logprob": round(float(lps[4]) - 2, 4), "bytes": list("é".encode())})
        content.append({"token": alts[0]["token"], "logprob": alts[0]["logprob"], "bytes": alts[0]["bytes"],
                        "top_logprobs": alts})
    if foreign and len(content) > 2:
        content[2] = {"token": "😀", "logprob": -0.5, "bytes": list("😀".encode()),
                      "top_logprobs": [{"token": "😀", "logprob": -0.5, "bytes": list("😀".encode())}]}
    text = "".join(c["token"] for c in content)
    return {"messages": messages,
            "response": {"id": "chatcmpl-fixture", "object": "chat.completion", "model": "demo-teacher",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text},
                                      "logprobs": {"content": content, "refusal": None}}]}}


def main() -> None:
    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "teacher")
    for name, foreign in (("openai_chat_logprobs.jsonl", False), ("openai_chat_logprobs_unmapped.jsonl", True)):
        rng = np.random.default_rng(0)
        with open(OUT / name, "w", encoding="utf-8") as f:
            for messages, answer in CONVERSATIONS:
                f.write(json.dumps(record(tok, rng, messages, answer, foreign), ensure_ascii=False) + "\n")
        print(OUT / name)


if __name__ == "__main__":
    main()
