"""Where a job runs: the device, the process's rank under torchrun, and the pad id of a tokenizer.

One rule each, shared by the teacher pass, generation, training and evaluation:

* ``resolve_device("auto" | "cuda" | "cpu")``: auto takes CUDA when torch sees it; a process started by
  torchrun takes GPU ``LOCAL_RANK mod device count``. ``cuda`` without a CUDA device is a DeviceError.
* ``resolve_dtype("auto" | "bf16" | "fp16" | "fp32", device)``: auto is bf16 on a GPU, fp32 on CPU.
* ``rank_and_world(cuda)``: (rank, world size); under torchrun (WORLD_SIZE > 1) the process group is
  started here, NCCL on GPUs and gloo on CPU.
* ``pad_id(tokenizer)``: the tokenizer's pad id, else its EOS id, else 0 (GPT-2-style tokenizers have no
  pad token; padded positions are masked out of every loss, so the id only has to be valid).
"""

from __future__ import annotations

import os

import torch

from teachercache.errors import TeachercacheError

DEVICES = ("auto", "cuda", "cpu")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""The --dtype choices besides auto."""


class DeviceError(TeachercacheError):
    """A device that is not there, or a device or dtype that is not known."""


def resolve_device(choice: str = "auto") -> torch.device:
    """The torch device for a ``--device`` choice (see the module docstring)."""
    if choice not in DEVICES:
        raise DeviceError(f"--device {choice!r}: choose auto, cuda or cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available (use --device cpu)")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a model for a ``--dtype`` choice on ``device`` (see the module docstring)."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if choice not in DTYPES:
        raise DeviceError(f"--dtype {choice!r}: choose auto, bf16, fp16 or fp32")
    return DTYPES[choice]


def rank_and_world(cuda: bool) -> tuple[int, int]:
    """(rank, world size) of this process; starts the process group under torchrun (WORLD_SIZE > 1)."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pad_id(tokenizer) -> int:
    """The id to pad rows with: pad, else EOS, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def load_causal_lm(name: str, dtype, trust_remote_code: bool, error: type[Exception], **placement):
    """(tokenizer, model) of a teacher given as a hub id or directory; ``error`` ("--teacher NAME: cannot be
    loaded (...)") when transformers cannot load them. Shared by the build and generate. ``placement``:
    from_pretrained's device_map / max_memory / offload_folder (accelerate places the layers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **placement)
    except (OSError, ValueError) as e:
        raise error(f"--teacher {name}: cannot be loaded ({e})") from None
    return tokenizer, model
