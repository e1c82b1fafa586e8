"""The fused C logit-statistics kernel (native/fse_stats.c) against a float64 numpy reference.

Every statistic is checked on every vector: max and argmax exactly (argmax is
the first index of the max, as llama.cpp's greedy sampler picks it), the
non-finite count exactly, and logsumexp, mean, variance and L2 norm to a
relative error of 1e-5, computed over the finite values only; the entropy of the
softmax to 1e-5 relative plus 1e-6 nats absolute (a distribution with one logit far
above the rest has an entropy near 0, where float lanes holding 1 + 1e-9 say 1).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt
import pytest
from fse._native import ffi, lib

N = 262_144  # a 262k vocabulary: the size the kernel is tuned for
RTOL = 1e-5
ENTROPY_ATOL = 1e-6  # nats
# Sizes around the vector widths (4, 8, 16 floats) and the block (2048 floats).
SIZES = [1, 2, 7, 15, 16, 17, 31, 33, 255, 256, 257, 2047, 2048, 2049, 4095, 4113]
SIZES += [100_003, N - 1, N, N + 1, N + 15]

Floats = npt.NDArray[np.float32]
VectorFn = Callable[[int, np.random.Generator], Floats]


@dataclass(frozen=True)
class Stats:
    max_logit: float
    argmax: int
    logsumexp: float
    entropy: float
    mean: float
    variance: float
    l2_norm: float
    n_nonfinite: int


def kernel(x: Floats) -> Stats:
    assert x.dtype == np.float32 and x.flags.c_contiguous
    out = ffi.new("fse_logit_stats *")
    lib.fse_logit_stats_compute(ffi.cast("float *", ffi.from_buffer(x)), x.size, out)
    return Stats(*(getattr(out, f.name) for f in fields(Stats)))


def reference(x: Floats) -> Stats:
    """The same statistics in float64 numpy, over the finite values only."""
    finite = np.isfinite(x)
    v = x[finite].astype(np.float64)
    n_nonfinite = int(x.size - v.size)
    if v.size == 0:
        return Stats(-math.inf, -1, math.nan, math.nan, math.nan, math.nan, math.nan, n_nonfinite)
    top = float(v.max())
    e = np.exp(v - top)
    p = e / e.sum()
    return Stats(
        max_logit=top,
        argmax=int(np.flatnonzero(finite)[np.argmax(v)]),  # np.argmax: first occurrence
        logsumexp=top + math.log(float(e.sum())),
        entropy=float(-(p[p > 0] * np.log(p[p > 0])).sum()),
        mean=float(v.mean()),
        variance=float(v.var()),
        l2_norm=math.sqrt(float((v * v).sum())),
        n_nonfinite=n_nonfinite,
    )


def assert_matches(x: Floats) -> Stats:
    got, want = kernel(x), reference(x)
    assert got.n_nonfinite == want.n_nonfinite
    assert got.argmax == want.argmax
    if want.argmax < 0:
        assert got.max_logit == -math.inf
        assert all(math.isnan(f) for f in (got.logsumexp, got.mean, got.variance, got.l2_norm))
        assert math.isnan(got.entropy)
        return got
    assert got.max_logit == want.max_logit
    for field in ("logsumexp", "mean", "variance", "l2_norm"):
        g, w = getattr(got, field), getattr(want, field)
        assert abs(g - w) <= RTOL * abs(w), f"{field}: kernel {g!r}, reference {w!r}"
    g, w = got.entropy, want.entropy
    assert abs(g - w) <= RTOL * w + ENTROPY_ATOL, f"entropy: kernel {g!r}, reference {w!r}"
    return got


# --- vectors -------------------------------------------------------------------------------

VECTORS: dict[str, VectorFn] = {}


def vector(fn: VectorFn) -> VectorFn:
    VECTORS[fn.__name__] = fn
    return fn


@vector
def normal(n: int, rng: np.random.Generator) -> Floats:
    return rng.standard_normal(n).astype(np.float32)


@vector
def llm_like(n: int, rng: np.random.Generator) -> Floats:
    """N(0, 5) with a few strong candidates on top, like a model's logits."""
    x = rng.normal(0.0, 5.0, n).astype(np.float32)
    peaks = rng.choice(n, size=min(n, 5), replace=False)
    x[peaks] = rng.uniform(20.0, 30.0, peaks.size).astype(np.float32)
    return x


@vector
def peaked(n: int, rng: np.random.Generator) -> Floats:
    """One value far above the rest: the distribution is nearly one-hot."""
    x = normal(n, rng)
    x[rng.integers(n)] = 1e4
    return x


@vector
def flat(n: int, rng: np.random.Generator) -> Floats:
    """All equal: the variance is exactly 0 and argmax is 0."""
    return np.full(n, 1.5, dtype=np.float32)


@vector
def huge(n: int, rng: np.random.Generator) -> Floats:
    return (rng.standard_normal(n) * 1e30).astype(np.float32)


@vector
def near_float_max(n: int, rng: np.random.Generator) -> Floats:
    """Finite values up to +-3.4e38: (x - shift) exceeds float range, not double."""
    x = rng.uniform(-3.4e38, 3.4e38, n).astype(np.float32)
    x[rng.integers(n)] = np.finfo(np.float32).max
    x[rng.integers(n)] = -np.finfo(np.float32).max
    return x


@vector
def offset(n: int, rng: np.random.Generator) -> Floats:
    """1e6 + N(0, 1): a naive sum of squares loses the variance to cancellation."""
    return (1e6 + rng.standard_normal(n)).astype(np.float32)


@vector
def negative(n: int, rng: np.random.Generator) -> Floats:
    return (-1e4 + rng.standard_normal(n)).astype(np.float32)


@vector
def tiny(n: int, rng: np.random.Generator) -> Floats:
    """Scale 1e-30, and subnormal floats: finite, exponent field 0."""
    x = (rng.standard_normal(n) * 1e-30).astype(np.float32)
    x[:: max(1, n // 7)] = np.float32(3e-42)
    return x


@vector
def wide(n: int, rng: np.random.Generator) -> Floats:
    """Spread over 400 units: most exp(x - max) terms underflow to the clamp."""
    return rng.uniform(-200.0, 200.0, n).astype(np.float32)


@vector
def rising(n: int, rng: np.random.Generator) -> Floats:
    """Every block raises the running max: the online rescale runs each time."""
    return np.linspace(-50.0, 50.0, n, dtype=np.float32)


@pytest.mark.parametrize("kind", VECTORS)
def test_vector_kinds(kind: str) -> None:
    rng = np.random.default_rng(1)
    for n in (N, N + 13):
        assert_matches(VECTORS[kind](n, rng))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["normal", "llm_like", "peaked"])
def test_sizes(n: int, kind: str) -> None:
    assert_matches(VECTORS[kind](n, np.random.default_rng(n)))


def test_empty() -> None:
    got = kernel(np.zeros(0, dtype=np.float32))
    assert (got.argmax, got.n_nonfinite, got.max_logit) == (-1, 0, -math.inf)
    assert all(math.isnan(f) for f in (got.logsumexp, got.mean, got.variance, got.l2_norm))


def test_flat_is_exact() -> None:
    got = assert_matches(flat(N + 5, np.random.default_rng(0)))
    assert got.argmax == 0
    assert got.mean == 1.5 and got.variance == 0.0
    assert got.logsumexp == pytest.approx(1.5 + math.log(N + 5), rel=1e-12)


def test_single_value() -> None:
    got = assert_matches(np.array([-3.25], dtype=np.float32))
    assert (got.argmax, got.max_logit, got.logsumexp, got.variance) == (0, -3.25, -3.25, 0.0)


# --- argmax ties: the first index of the max wins --------------------------------------------


@pytest.mark.parametrize(
    "positions",
    [
        (0, 1),
        (5, 3000),
        (17, 16),
        (N - 1, N - 2, 2048),
        (2049, 2048, 4096),
        (100, 100_000, 200_000, 262_000),
    ],
)
def test_ties_pick_first_index(positions: tuple[int, ...]) -> None:
    x = normal(N, np.random.default_rng(2))
    x[list(positions)] = 9.0
    got = assert_matches(x)
    assert got.argmax == min(positions)


def test_signed_zero_tie() -> None:
    """-0.0 == +0.0: the first of them is the argmax, whichever its sign."""
    x = -np.abs(normal(N, np.random.default_rng(3))) - np.float32(1.0)
    x[70_000] = np.float32(-0.0)
    x[90_000] = np.float32(0.0)
    assert kernel(x).argmax == 70_000


def test_max_in_tail() -> None:
    x = normal(N + 7, np.random.default_rng(4))
    x[N + 3] = 50.0
    assert assert_matches(x).argmax == N + 3


# --- non-finite values: counted wherever they are, and left out of everything else -------------

NONFINITE = {"nan": np.float32(np.nan), "+inf": np.float32(np.inf), "-inf": np.float32(-np.inf)}
# Quiet, signalling and negative NaNs with payloads, then +Inf and -Inf.
NONFINITE_BITS = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF]
NONFINITE_BITS += [0x7FA00000, 0x7F800000, 0xFF800000]


def positions_for(n: int) -> list[int]:
    """First, last, vector and block edges, the middle, the tail, and random positions."""
    edges = [0, 1, 7, 8, 15, 16, 17, 255, 256, 2047, 2048, 2049, n // 2]
    edges += [n - 17, n - 16, n - 9, n - 8, n - 2, n - 1]
    rng = np.random.default_rng(n)
    return sorted({p for p in edges if 0 <= p < n} | {int(p) for p in rng.integers(0, n, 6)})


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize(("n", "pos"), [(n, p) for n in (N, N + 13) for p in positions_for(n)])
def test_one_nonfinite_anywhere(n: int, pos: int, value: str) -> None:
    x = llm_like(n, np.random.default_rng(5))
    x[pos] = NONFINITE[value]
    got = assert_matches(x)
    assert got.n_nonfinite == 1
    assert got.argmax != pos


@pytest.mark.parametrize("value", NONFINITE)
def test_nonfinite_at_every_position_of_a_small_vector(value: str) -> None:
    """n = 37: one full block of two vectors plus a tail, a bad value at each index."""
    base = normal(37, np.random.default_rng(6))
    for pos in range(37):
        x = base.copy()
        x[pos] = NONFINITE[value]
        assert assert_matches(x).n_nonfinite == 1


def test_nonfinite_next_to_the_max() -> None:
    """+Inf is not the max, a NaN does not hide it, and -Inf does not lower it."""
    x = normal(N, np.random.default_rng(7))
    x[1000] = 40.0
    x[[999, 1001, 17, 200_000]] = [np.inf, np.nan, -np.inf, np.inf]
    got = assert_matches(x)
    assert (got.argmax, got.max_logit, got.n_nonfinite) == (1000, 40.0, 4)


def test_every_nan_and_inf_encoding_is_counted() -> None:
    """Quiet, signalling and negative NaNs, payloads, and both infinities: all exponent bits set."""
    patterns = np.array(NONFINITE_BITS, dtype=np.uint32)
    x = llm_like(N, np.random.default_rng(8))
    where = np.random.default_rng(9).choice(N, size=patterns.size * 20, replace=False)
    x.view(np.uint32)[where] = np.tile(patterns, 20)
    x[5] = np.finfo(np.float32).max  # the largest finite float is not counted
    got = assert_matches(x)
    assert got.n_nonfinite == where.size
    assert got.max_logit == np.finfo(np.float32).max
    x[5] = -np.finfo(np.float32).max  # nor the lowest (with both, the mean is ill-conditioned)
    assert assert_matches(x).n_nonfinite == where.size


def test_many_nonfinite_scattered() -> None:
    rng = np.random.default_rng(10)
    x = llm_like(N + 11, rng)
    where = rng.choice(x.size, size=5000, replace=False)
    x[where] = rng.choice([np.nan, np.inf, -np.inf], size=where.size).astype(np.float32)
    assert assert_matches(x).n_nonfinite == 5000


def test_whole_blocks_of_nan() -> None:
    """Blocks with no finite value at all, at the start, in the middle and at the end."""
    x = normal(N + 3, np.random.default_rng(11))
    x[:4096] = np.nan
    x[100_000:110_000] = -np.inf
    x[N - 5000 :] = np.inf
    got = assert_matches(x)
    assert got.n_nonfinite == 4096 + 10_000 + 5003
    assert got.argmax >= 4096


@pytest.mark.parametrize("n", [1, 5, 16, 2048, N, N + 3])
@pytest.mark.parametrize("value", [*NONFINITE, "mixed"])
def test_nothing_finite(n: int, value: str) -> None:
    if value == "mixed":
        x = np.array([np.nan, np.inf, -np.inf], dtype=np.float32)[np.arange(n) % 3]
    else:
        x = np.full(n, NONFINITE[value], dtype=np.float32)
    got = assert_matches(x)
    assert (got.argmax, got.n_nonfinite) == (-1, n)


def test_one_finite_among_nonfinite() -> None:
    x = np.full(N, -np.inf, dtype=np.float32)
    x[123_456] = -2.5
    x[:10] = np.nan
    got = assert_matches(x)
    assert (got.argmax, got.max_logit, got.logsumexp, got.mean) == (123_456, -2.5, -2.5, -2.5)
    assert got.variance == 0.0 and got.l2_norm == 2.5


def test_opposite_infinities_in_one_lane() -> None:
    """+Inf then -Inf in the same vector lane of one block (indices 16 apart): still counted."""
    x = normal(N, np.random.default_rng(13))
    x[[32, 48, 64, 4096 + 32]] = [np.inf, -np.inf, np.nan, -np.inf]
    assert assert_matches(x).n_nonfinite == 4


# --- bounds: nothing past logits[n - 1] is read ----------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 3, 8, 15, 16, 17, 2047, 2048, 2049, N - 1, N, N + 7])
def test_does_not_read_past_n(n: int) -> None:
    """The n logits are followed by NaNs that the kernel must never see."""
    buf = np.full(n + 64, np.nan, dtype=np.float32)
    buf[:n] = normal(n, np.random.default_rng(12))
    got = kernel(buf[:n])
    assert got.n_nonfinite == 0
    if n:
        assert_matches(buf[:n])


def test_does_not_touch_the_next_page() -> None:
    """Logits that end exactly at an unreadable page: any read past n is a segfault."""
    script = textwrap.dedent(
        """
        import ctypes, mmap
        import numpy as np
        from fse._native import ffi, lib

        page = mmap.PAGESIZE
        size = 300 * page
        buf = mmap.mmap(-1, size + page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(base + size, page, 0) == 0  # PROT_NONE
        floats = np.frombuffer(buf, dtype=np.float32, count=size // 4)
        floats[:] = np.random.default_rng(0).standard_normal(floats.size)
        out = ffi.new("fse_logit_stats *")
        for n in [1, 7, 15, 17, 2047, 2049, 100_003, size // 4]:
            lib.fse_logit_stats_compute(ffi.cast("float *", base + size - 4 * n), n, out)
            assert out.n_nonfinite == 0 and out.argmax >= 0, n
        print("ok")
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


def test_entropy_of_known_distributions() -> None:
    """Uniform over n: ln n; two equal leaders far above the rest: ln 2; the leaders
    in the last block (the running max raised at the end): the same; NaN/Inf are left
    out exactly as for the other statistics."""
    assert kernel(np.zeros(N, dtype=np.float32)).entropy == pytest.approx(math.log(N), rel=1e-6)
    two = np.full(N, -100.0, dtype=np.float32)
    two[[5, N - 3]] = 50.0
    assert kernel(two).entropy == pytest.approx(math.log(2), rel=1e-6)
    rising = np.linspace(-20.0, 20.0, N, dtype=np.float32)
    assert_matches(rising)
    dirty = np.zeros(N, dtype=np.float32)
    dirty[[7, 4096, N - 1]] = [np.nan, np.inf, -np.inf]
    got = kernel(dirty)
    assert got.n_nonfinite == 3
    assert got.entropy == pytest.approx(math.log(N - 3), rel=1e-6)
