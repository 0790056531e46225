"""Numerics shared by the teacher pass and the student's losses: numba's threading set-up and a fast exp.

Threading. numba's threading layer is set to ``workqueue`` here (unless NUMBA_THREADING_LAYER says
otherwise), before any parallel kernel is compiled: it ships with every numba wheel and is fork-safe, so
DataLoader workers forked after a kernel ran keep working (GNU OpenMP, numba's usual pick on Linux, is
not). Workqueue does not take concurrent launches from several threads, so every numba-parallel launch
holds ``LAUNCH_LOCK``.

exp. ``exp_row`` is a float32 exp over a row that LLVM vectorises (numba's ``math.exp`` is one scalar
libm call per element): Cody-Waite reduction x = k ln2 + r with |r| <= ln2/2, Cephes' degree-6
polynomial for exp(r) (relative error ~1e-7), 2^k written as exponent bits. Arguments below -87 are
clamped there (exp(-87) = 1.6e-38: < 1e-37 in any sum); NaN passes through. Rows go in blocks of 2048 so
the scratch array and the block stay in L1. Used for the softmax of the student's logits
(student.losses) and of the teacher's (teachercache.teacher.targets).
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

LAUNCH_LOCK = threading.Lock()
"""Held while a numba-parallel kernel runs (workqueue does not take concurrent launches)."""

_EXP_BLOCK = 2048
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)


@numba.njit(nogil=True, cache=True, fastmath={"contract"})
def _exp_mantissas(row, m, scale, out, bits):
    for v in range(row.shape[0]):
        x = (row[v] - m) * scale
        x = np.float32(-87.0) if x < np.float32(-87.0) else x
        ki = np.int32(x * _LOG2E - np.float32(0.5))   # x <= 0: truncation rounds to nearest
        k = np.float32(ki)
        r = x - k * _LN2_HI - k * _LN2_LO
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        out[v] = p * r * r + r + np.float32(1.0)
        bits[v] = (ki + np.int32(127)) << np.int32(23)


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def _scale_and_sum(out, powers):
    total = 0.0
    for v in range(out.shape[0]):
        e = out[v] * powers[v]
        out[v] = e
        total += e
    return total


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "nsz", "contract"})
def _shifted_dot(e, row, m):
    """sum_v e_v (row_v - m) in float64, vectorised."""
    total = 0.0
    for v in range(row.shape[0]):
        total += e[v] * (row[v] - m)
    return total


@numba.njit(nogil=True, cache=True)
def _exp_blocks(row, m, scale, out, with_dot):
    """out[v] = exp((row[v] - m) * scale), block by block; returns (sum of out, and when ``with_dot``
    sum_v out[v] (row[v] - m), each block summed while it is in the L1 cache), in float64."""
    bits = np.empty(_EXP_BLOCK, np.int32)
    powers = bits.view(np.float32)
    total = 0.0
    dot = 0.0
    n = row.shape[0]
    for a in range(0, n, _EXP_BLOCK):
        b = min(a + _EXP_BLOCK, n)
        _exp_mantissas(row[a:b], m, scale, out[a:b], bits)
        total += _scale_and_sum(out[a:b], powers)
        if with_dot:
            dot += _shifted_dot(out[a:b], row[a:b], m)
    return total, dot


@numba.njit(nogil=True, cache=True)
def exp_row(row, m, scale, out):
    """out[v] = exp((row[v] - m) * scale) for a float32 row with max m (so every argument is <= 0);
    returns the sum in float64."""
    return _exp_blocks(row, m, scale, out, False)[0]


@numba.njit(nogil=True, cache=True)
def exp_row_and_dot(row, m, scale, out):
    """exp_row, and also sum_v out[v] (row[v] - m) (for an entropy); returns both sums in float64."""
    return _exp_blocks(row, m, scale, out, True)
