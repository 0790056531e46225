"""The value quantiser of the target codec: -log p -> integer code, and the table that maps codes back.

The quantiser is piecewise uniform; its parameters (``schema.Quantizer``: piece starts, steps, max_nats)
are part of a cache's layout, and docs/FORMAT.md ("Quantised log-probs") gives the code and its decoded
value. ``code_of`` is the encoder kernel's helper, ``quantize_reference`` its plain numpy reference, and
``logprob_table`` the decoder's lookup table.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from teachercache.format import schema as S


def quantizer_arrays(q: S.Quantizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, steps, bases) as float64/float64/int64 arrays for the kernels; bases[-1] is the max code."""
    return (np.asarray(q.starts, np.float64), np.asarray(q.steps, np.float64),
            np.asarray(q.bases(), np.int64))


@functools.lru_cache(maxsize=16)
def logprob_table(q: S.Quantizer) -> np.ndarray:
    """(max_code + 1,) float32, read-only: the log-prob each code decodes to."""
    starts, steps, bases = quantizer_arrays(q)
    codes = np.arange(bases[-1] + 1)
    piece = np.searchsorted(bases[1:-1], codes, side="right")
    table = (-(starts[piece] + (codes - bases[piece]) * steps[piece])).astype(np.float32)
    table.flags.writeable = False
    return table


def quantize_reference(logprobs: np.ndarray, q: S.Quantizer) -> np.ndarray:
    """Plain numpy reference of the kernels' code of -log p (int64 codes)."""
    starts, steps, bases = quantizer_arrays(q)
    x = np.clip(-np.asarray(logprobs, np.float64), 0.0, q.max_nats)
    piece = np.searchsorted(starts, x, side="right") - 1
    codes = bases[piece] + np.floor((x - starts[piece]) / steps[piece] + 0.5).astype(np.int64)
    return np.minimum(codes, bases[-1])


@numba.njit(nogil=True, cache=True, inline="always")
def code_of(lp, starts, steps, bases, max_nats):
    """The code of -lp (numba; the arrays from quantizer_arrays)."""
    x = -np.float64(lp)
    if x < 0.0:
        x = 0.0
    if x > max_nats:
        x = max_nats
    i = len(starts) - 1
    while starts[i] > x:
        i -= 1
    c = bases[i] + np.int64(np.floor((x - starts[i]) / steps[i] + 0.5))
    return min(c, bases[-1])
