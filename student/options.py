"""What ``teachercache train`` takes: ``TrainOptions``, composed of one small dataclass per concern.

Every default and every help text is written here once (the docstring under each field); the click
command builds its flags from these fields (teachercache.cli.options.field_option), and the library
takes the same objects:

    train(TrainOptions(cache="CACHE", student="llama-small", out="OUT",
                       schedule=ScheduleOptions(steps=200, lr=3e-3), kd=KDOptions(ce_weight=0.1)))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from teachercache.student.cross_tokenizer import CROSS_TOKENIZER_MODES
from teachercache.student.kd_types import KDConfig
from teachercache.errors import OptionError, check_number
from teachercache.format.mirror import DEFAULT_CACHE_DIR_BYTES, DEFAULT_PREFETCH_SHARDS

REPORT_TO = ("none", "tensorboard", "wandb")
"""Where --report-to also sends the metrics of metrics.jsonl (student.tracking)."""


@dataclass(frozen=True)
class ScheduleOptions:
    """Steps, batches and the optimizer: AdamW, linear warmup, then cosine decay."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 8
    """Rows per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear warmup steps, then cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a share of the peak."""
    max_grad_norm: float = 1.0
    """Gradient clipping by total norm (0: off)."""

    def __post_init__(self):
        for name, flag in (("steps", "--steps"), ("batch_size", "--batch-size"), ("grad_accum", "--grad-accum")):
            check_number("train", f"{name} ({flag})", getattr(self, name), low=1, integer=True)
        check_number("train", "warmup_steps (--warmup-steps)", self.warmup_steps, low=0, integer=True)
        check_number("train", "lr (--lr)", self.lr, low=0, low_open=True)
        check_number("train", "weight_decay (--weight-decay)", self.weight_decay, low=0)
        check_number("train", "min_lr_ratio (--min-lr-ratio)", self.min_lr_ratio, low=0, high=1)
        check_number("train", "max_grad_norm (--max-grad-norm)", self.max_grad_norm, low=0)


@dataclass(frozen=True)
class KDOptions:
    """The distillation loss: KDConfig's fields, with the loss chosen by the cache when left out."""

    loss: str | None = None
    """KD loss, one of student.losses.LOSSES [default: sampled_ce for sampled caches, else forward_kl]."""
    tail: str = KDConfig.tail
    """rest: a (k+1)-th bucket for the unstored mass; renormalize: the teacher's stored mass scaled to 1
    (Axolotl's loss)."""
    temperature: float = KDConfig.temperature
    """KD temperature (the KD term is scaled by T²)."""
    beta: float = KDConfig.beta
    """jsd: mixture weight."""
    alpha: float = KDConfig.alpha
    """skew_kl / skew_reverse_kl: the skew α."""
    ce_weight: float = KDConfig.ce_weight
    """Weight of the hard-label cross-entropy."""
    kd_weight: float = KDConfig.kd_weight
    """Weight of the KD loss."""

    def __post_init__(self):
        check_number("train", "temperature (--temperature)", self.temperature, low=0, low_open=True)
        check_number("train", "beta (--beta)", self.beta, low=0, high=1)
        check_number("train", "alpha (--skew-alpha)", self.alpha, low=0, high=1)
        check_number("train", "ce_weight (--ce-alpha)", self.ce_weight, low=0)
        check_number("train", "kd_weight (--kd-alpha)", self.kd_weight, low=0)

    def config(self, sampled: bool) -> KDConfig:
        """The kernels' KDConfig for a cache of sampled (or other) targets; ValueError when out of range."""
        return KDConfig(**{**asdict(self), "loss": self.loss or ("sampled_ce" if sampled else "forward_kl")})


@dataclass(frozen=True)
class HintOptions:
    """Hint loss between the student's hidden states and the teacher's cached ones (student.hint)."""

    layers: str = ""
    """Hint pairs STUDENT:TEACHER, e.g. 2:4 (the cache must hold those teacher layers)."""
    weight: float = 1.0
    """Weight of the hint loss."""
    kind: str = "mse"
    """mse or cosine."""

    def __post_init__(self):
        check_number("train", "hint weight (--hint-alpha)", self.weight, low=0)


@dataclass(frozen=True)
class LoaderOptions:
    """How rows are read from the cache (student.dataset)."""

    shuffle: bool = True
    """Shuffle shards, record batches and rows every epoch (off: file order)."""
    shuffle_buffer: int = 1024
    """Rows a reader's shuffle buffer holds."""
    num_workers: int = 0
    """DataLoader worker processes."""
    prefetch_shards: int = DEFAULT_PREFETCH_SHARDS
    """A cache at a URL (s3://, gs://, hf://, ...): shards downloaded ahead of the one being read (0: none)."""
    cache_dir: str | None = None
    """A cache at a URL: keep downloaded shards in this directory (shared by runs and caches, least recently used
    deleted first); none: a temporary directory keeps only the shards being read."""
    cache_dir_gb: float = DEFAULT_CACHE_DIR_BYTES / (1 << 30)
    """With --cache-dir: the most GiB of shards it keeps."""

    def __post_init__(self):
        check_number("train", "shuffle_buffer", self.shuffle_buffer, low=1, integer=True)
        check_number("train", "num_workers (--num-workers)", self.num_workers, low=0, integer=True)
        check_number("train", "prefetch_shards (--prefetch-shards)", self.prefetch_shards, low=0, integer=True)
        check_number("train", "cache_dir_gb (--cache-dir-gb)", self.cache_dir_gb, low=0, low_open=True)

    def cache_kwargs(self) -> dict:
        """The keyword arguments of Cache.open (and CacheDataset) that these options set."""
        return {"prefetch_shards": self.prefetch_shards, "cache_dir": self.cache_dir,
                "cache_dir_bytes": int(self.cache_dir_gb * (1 << 30))}


@dataclass(frozen=True)
class EvalOptions:
    """Held-out evaluation during training (student.evaluate)."""

    data: str | None = None
    """Held-out cache directory or text file for evaluation."""
    every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    rows: int | None = None
    """Evaluate on at most this many rows."""
    seq_len: int = 512
    """Text files: tokens per row."""

    def __post_init__(self):
        check_number("train", "eval every (--eval-every)", self.every, low=0, integer=True)
        if self.rows is not None:
            check_number("train", "eval rows (--eval-rows)", self.rows, low=1, integer=True)
        check_number("train", "eval seq_len", self.seq_len, low=1, integer=True)


@dataclass(frozen=True)
class CheckpointOptions:
    """Checkpoints (safetensors + JSON) and resuming from them (student.checkpoints)."""

    every: int = 0
    """Checkpoint every N steps (0: never)."""
    keep: int = 2
    """Checkpoints kept (older ones are deleted)."""
    resume: bool = False
    """Continue from the latest checkpoint in the output directory."""

    def __post_init__(self):
        check_number("train", "checkpoint every (--checkpoint-every)", self.every, low=0, integer=True)
        check_number("train", "checkpoints kept", self.keep, low=0, integer=True)


@dataclass(frozen=True)
class TrainOptions:
    """Everything `teachercache train` needs; the CLI maps its flags onto this and nothing else."""

    cache: str
    """Cache directory to learn from."""
    student: str
    """Pretrained directory or hub id, a config .json (fresh weights), or a preset: llama-tiny,
    llama-small, llama-base."""
    out: str
    """Directory for the trained student."""
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    """Steps, batches, optimizer and learning-rate schedule."""
    kd: KDOptions = field(default_factory=KDOptions)
    """The distillation loss."""
    hint: HintOptions = field(default_factory=HintOptions)
    """The hint loss (off unless layers are given)."""
    loader: LoaderOptions = field(default_factory=LoaderOptions)
    """Reading the cache."""
    eval: EvalOptions = field(default_factory=EvalOptions)
    """Held-out evaluation."""
    checkpoints: CheckpointOptions = field(default_factory=CheckpointOptions)
    """Checkpoints and resume."""
    fused_head: bool = False
    """LM head + loss in chunks: no [batch, seq, vocab] logits."""
    chunk_size: int = 1024
    """fused_head: positions per chunk."""
    seed: int = 0
    """Seed of the weights of a fresh student, the shuffle and every RNG."""
    log_every: int = 10
    """Write metrics every N steps."""
    report_to: str = "none"
    """Also send every logged metric to: none, tensorboard (event files in the output directory's runs/) or
    wandb (offline unless WANDB_MODE or WANDB_API_KEY is set)."""
    max_nonfinite_steps: int = 1
    """Stop after this many consecutive steps whose loss or gradient is NaN/inf (each is skipped without
    an update; the run ends with an error naming the step and the last good checkpoint)."""
    online_teacher: str | None = None
    """Baseline: KD from this live teacher instead of the cache."""
    cross_tokenizer: str | None = None
    """A student whose tokenizer is not the teacher's: exact (stored teacher ids mapped to the student ids that
    spell the same bytes, the unmapped mass into the rest bucket) or uld (universal logit distillation over
    sorted probabilities, with --ce-alpha > 0); positions aligned by byte offset (docs/cross_tokenizer.md)."""
    unaligned_ce_weight: float = 1.0
    """--cross-tokenizer: weight of the cross-entropy at the student's positions that no teacher position aligns
    with (they get no KD)."""
    device: str = "auto"
    """auto (cuda if available), cuda, cpu."""
    trust_remote_code: bool = False
    """Let transformers run the student repository's own code (off unless asked for)."""
    progress: bool = True
    """Show a tqdm bar."""

    def __post_init__(self):
        check_number("train", "chunk_size (--chunk-size)", self.chunk_size, low=1, integer=True)
        check_number("train", "log_every (--log-every)", self.log_every, low=1, integer=True)
        if self.report_to not in REPORT_TO:
            raise OptionError(f"train: report_to (--report-to) must be one of {', '.join(REPORT_TO)}, "
                              f"got {self.report_to!r}")
        check_number("train", "max_nonfinite_steps (--max-nonfinite-steps)", self.max_nonfinite_steps, low=1,
                     integer=True)
        if self.cross_tokenizer not in (None, *CROSS_TOKENIZER_MODES):
            raise OptionError(f"train: cross_tokenizer (--cross-tokenizer) must be one of "
                              f"{', '.join(CROSS_TOKENIZER_MODES)}, got {self.cross_tokenizer!r}")
        check_number("train", "unaligned_ce_weight (--unaligned-ce-alpha)", self.unaligned_ce_weight, low=0)

