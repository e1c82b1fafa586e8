// fse_stats.c: fused logit statistics in one pass over memory.
//
// The kernel runs once per stream per decode step over n_vocab float32 logits
// (1 MiB for a 262k vocabulary), so it must cost far less than the ~10 ms step.
//
// Algorithm: one pass over memory, two sweeps over each L1-resident block.
//   The logits are cut into blocks of FSE_BLOCK floats (8 KiB; L1d is 32 KiB).
//   Sweep 1 reads a block from memory: per-lane max, and the moments
//   sum(x - shift) and sum((x - shift)^2) in double, shift being the first
//   finite logit so that 1e6 + N(0,1) keeps its variance. A NaN or Inf in
//   the block makes those double sums non-finite (a free test); the block is
//   then redone by a careful sweep that counts them from their exponent bits,
//   leaves them out of the max and the moments, and writes a copy of the
//   block with -Inf in their place to an L1 scratch for sweep 2.
//   The block max then updates the running max M (online logsumexp): if it
//   raises M, the running sums are rescaled once by exp(M_old - M_new).
//   Sweep 2 re-reads the block from L1 and adds exp(x - M), computed with a
//   polynomial, and exp(x - M) * (x - M), into float lanes that are folded into
//   doubles once per block. The entropy of the softmax is then
//   H = log(sum e) - sum(e * (x - M)) / sum(e), in nats: a sum of two terms >= 0,
//   so it keeps the kernel's relative precision. On a raise of M by d the second
//   sum becomes r * (sum + (-d) * sum e) before sum e is scaled by r.
//   argmax: the running max remembers the first block where it appeared
//   (strict >, so ties keep the earlier block); one scan of that block at the
//   end finds the first index equal to the max, as llama.cpp's greedy sampler
//   would. A tail shorter than a vector goes through the same code as a
//   NaN-padded copy whose padding is taken off the count: no read past n.
//
// Why this shape:
// - A max pass then an exp pass reads the 1 MiB twice, the second time from L2
//   instead of L1: 90 us against 83 us here (AMD EPYC, AVX-512) for 262,144
//   logits. FSE_BLOCK=262144 turns this file into that two-pass kernel.
// - libm expf does not vectorize without -ffast-math, and -ffast-math or
//   -ffinite-math-only must never be used here: they let the compiler delete
//   the NaN/Inf checks the fail-closed non_finite guard depends on. So
//   exp(t), t <= 0, is 2^k * p(f) with k = round(t*log2(e)), f = t*log2(e) - k
//   in one fma (so f keeps its low bits), p a degree-5 minimax polynomial for
//   2^f on [-1/2, 1/2] (relative error < 2e-7), and t clamped to -87 so 2^k is
//   a normal float. k is added straight into the exponent bits.
// - Vectors are GCC vector extensions, and the kernel below is compiled once
//   per vector width, each for its own instruction set: 16 floats for
//   AVX-512, 8 for AVX2+FMA, 4 for baseline x86-64 (SSE2) and other CPUs. The
//   width must match the registers: GCC keeps wider vectors in memory (16
//   floats on AVX2: 6x slower), and 8 floats take 19% longer than 16 on this
//   AVX-512 CPU. The choice is made at run time from the CPU's features.
//
// Layout: this file holds what does not depend on the width and the entry
// point; fse_stats_width.h is the vector kernel, included once per width with
// FSE_W and FSE_TARGET set, its names suffixed with the width.

#include "fse.h"

#include <math.h>
#include <string.h>

#ifndef FSE_BLOCK
#define FSE_BLOCK 2048 // floats per block: 8 KiB, stays in L1 between the sweeps
#endif

// Running statistics, folded in once per block.
typedef struct stats_state {
    double  sum_d;     // sum of (x - shift) over the finite logits so far
    double  sum_d2;    // sum of (x - shift)^2
    double  sumexp;    // sum of exp(x - max)
    double  sum_et;    // sum of exp(x - max) * (x - max): the entropy's E[x - max]
    float   max;       // running max of the finite logits
    int32_t max_start; // start of the first block that reached max
    int32_t nonfinite; // NaN/Inf seen so far
} stats_state;

#define FSE_INLINE static inline __attribute__((always_inline))

// Vector helpers return vectors but take scalars or pointers: a vector wider
// than the baseline's registers passed by value makes GCC print an ABI note,
// although the helpers are always inlined and never cross an ABI boundary.
// The return-value form of that diagnostic is -Wpsabi, silenced for the same
// reason.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// Generic over the width: vf/vi are the current instantiation's types.
// Lanes of m are 0 or -1: picks a where m is set, b elsewhere.
#define SELECT(m, a, b) ((vf) (((m) & (vi) (a)) | (~(m) & (vi) (b))))
// Lane-wise max; a NaN in a is ignored (the compare is false).
#define MAX(a, b)       SELECT((a) > (b), a, b)
// NaN or +-Inf: all exponent bits set. A bit test, so no compiler flag can drop it.
#define NONFINITE(v)    (((vi) (v) & ((vi) {0} + 0x7f800000)) == ((vi) {0} + 0x7f800000))

// A block with max bmax, starting at logits[start], has been summed into st
// from here on: move the old exp sum to the new max, once per raise.
FSE_INLINE void raise_max(stats_state * st, float bmax, int32_t start) {
    if (bmax > st->max) {
        if (st->max != -INFINITY) {
            // x - new max = (x - old max) + delta, each term scaled by r.
            const double delta = (double) st->max - (double) bmax;
            const double r     = exp(delta);
            st->sum_et         = r * (st->sum_et + delta * st->sumexp);
            st->sumexp *= r;
        }
        st->max       = bmax;
        st->max_start = start;
    }
}

#define FSE_CAT_(a, b) a##_##b
#define FSE_CAT(a, b)  FSE_CAT_(a, b)

#if defined(__x86_64__) || defined(__i386__)
#define FSE_X86 1

#define FSE_W      16
#define FSE_TARGET __attribute__((target("avx512f")))
#include "fse_stats_width.h" // stats_blocks_16
#undef FSE_TARGET
#undef FSE_W

#define FSE_W      8
#define FSE_TARGET __attribute__((target("avx2,fma")))
#include "fse_stats_width.h" // stats_blocks_8
#undef FSE_TARGET
#undef FSE_W
#endif

#define FSE_W      4
#define FSE_TARGET
#include "fse_stats_width.h" // stats_blocks_4: SSE2 on any x86-64, NEON on arm64
#undef FSE_TARGET
#undef FSE_W

static int is_finite_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof(bits));
    return (bits & 0x7f800000u) != 0x7f800000u;
}

static void set_no_finite(int32_t n, fse_logit_stats * out) {
    out->max_logit   = -INFINITY;
    out->argmax      = -1;
    out->logsumexp   = NAN;
    out->entropy     = NAN;
    out->mean        = NAN;
    out->variance    = NAN;
    out->l2_norm     = NAN;
    out->n_nonfinite = n > 0 ? n : 0;
}

void fse_logit_stats_compute(const float * logits, int32_t n, fse_logit_stats * out) {
    // The shift for the moments is the first finite logit; none means no stats.
    int32_t first = 0;
    while (first < n && !is_finite_bits(logits[first])) {
        first++;
    }
    if (first >= n) {
        set_no_finite(n, out);
        return;
    }
    const float shift = logits[first];

    stats_state st = { .max = -INFINITY };
#ifdef FSE_X86
    if (__builtin_cpu_supports("avx512f")) {
        stats_blocks_16(logits, n, shift, &st);
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        stats_blocks_8(logits, n, shift, &st);
    } else
#endif
    {
        stats_blocks_4(logits, n, shift, &st);
    }

    // The max is finite and sits in the block that starts at max_start.
    int32_t argmax = st.max_start;
    while (logits[argmax] != st.max) {
        argmax++;
    }

    const double m      = (double) (n - st.nonfinite);
    const double s      = shift;
    const double mean_d = st.sum_d / m;
    const double var    = st.sum_d2 / m - mean_d * mean_d;
    // sum(x^2) = sum((s + d)^2). Every term is <= 4 m max(x^2) and the result is
    // >= max(x^2), so the cancellation costs a few m ulps: far below 1e-5.
    const double sumsq = m * s * s + 2.0 * s * st.sum_d + st.sum_d2;

    out->max_logit   = st.max;
    out->argmax      = argmax;
    out->logsumexp   = (double) st.max + log(st.sumexp);
    // H = logsumexp - E_p[x] = log(sumexp) - E_p[x - max]: both terms >= 0, no
    // cancellation.
    const double h   = log(st.sumexp) - st.sum_et / st.sumexp;
    out->entropy     = h > 0.0 ? h : 0.0;
    out->mean        = s + mean_d;
    out->variance    = var > 0.0 ? var : 0.0;
    out->l2_norm     = sqrt(sumsq > 0.0 ? sumsq : 0.0);
    out->n_nonfinite = st.nonfinite;
}
