"""Other tools' files in and out: export to Axolotl / Hugging Face datasets, import of vLLM prompt
log-probs and OpenAI chat log-probs. The importers share ``logprobs`` (JSONL records, the rest mass and
entropy estimate of a top-k list, the cache they write).
"""
