// fse_stats.c: fused logit statistics in one pass over memory.
//
// The kernel runs once per stream per decode step over n_vocab float32 logits
// (1 MiB for a 262k vocabulary), so it must cost far less than the ~10 ms step.
//
// Algorithm (one pass over memory, two sweeps over each L1-sized block):
//   The input is cut into blocks of FSE_BLOCK floats (8 KiB, well inside L1d).
//   Sweep 1 over a block reads the logits once from memory and
//     - flags NaN/Inf from the exponent bits and counts them per lane,
//     - keeps a per-lane max of the finite values (non-finite lanes become -Inf),
//     - adds (x - shift) and (x - shift)^2 into per-lane double accumulators,
//       shift being the first finite logit, so 1e6 + N(0,1) keeps its variance,
//     - writes the sanitized block (-Inf in non-finite lanes) to an L1 scratch.
//   The block max then updates the running max M with the online logsumexp
//   rule: if the block raises M, the running sum is rescaled once by
//   exp(M_old - M_new) (one scalar exp per block, and only when M grows).
//   Sweep 2 reads the scratch back from L1 and adds exp(x - M) with a vector
//   polynomial exp into per-lane float sums, folded into a double per block.
//   argmax is recovered at the end: the running max remembers the first block
//   where it appeared (strict >, so ties keep the earlier block), and a scan of
//   that one block finds the first index equal to the max.
//   Tails shorter than a vector go through the same code in a NaN-padded copy;
//   the padding is subtracted from the non-finite count. The kernel never
//   reads past logits[n-1].
//
// Why this shape: a two-pass kernel (max pass, then exp pass) reads 1 MiB
// twice; the blocked one-pass version reads it once and re-reads only L1.
// libm expf does not vectorize without -ffast-math, and -ffast-math (or
// -ffinite-math-only) must never be used here because it lets the compiler
// delete the NaN/Inf checks the fail-closed non_finite guard depends on. So exp
// is an explicit Cephes-style polynomial (2^k * p(r), |r| <= ln2/2) on
// arguments clamped to [-87, 0], which is exact enough (~1 ulp) for a sum.
// Vectors are GCC vector extensions; target_clones builds AVX-512, AVX2+FMA
// and baseline versions of the kernel and picks one at load time.

#include "fse.h"

#include <math.h>
#include <string.h>

#define FSE_LANES 16   // floats per vector
#define FSE_BLOCK 2048 // floats per block: 8 KiB, stays in L1 between the sweeps

typedef float    v16f __attribute__((vector_size(64)));
typedef int32_t  v16i __attribute__((vector_size(64)));
typedef float    v8f  __attribute__((vector_size(32)));
typedef double   v8d  __attribute__((vector_size(64)));

// Per-call running state, shared by the blocks.
typedef struct stats_state {
    v8d     sum_d;     // per-lane sum of (x - shift) over finite x
    v8d     sum_d2;    // per-lane sum of (x - shift)^2 over finite x
    v16i    nonfinite; // per-lane count of NaN/Inf, negated (masks are -1)
    double  sumexp;    // sum of exp(x - max) over the blocks seen so far
    float   max;       // running max of the finite values
    int32_t max_start; // first block that reached max: its start and length
    int32_t max_len;
} stats_state;

#define FSE_INLINE static inline __attribute__((always_inline))

// Helpers return vectors but take scalars or pointers: a 64-byte vector passed
// by value makes GCC print an ABI note for the baseline target, even though
// these are always inlined and never cross an ABI boundary. The return-value
// form of that diagnostic is a real -Wpsabi warning, silenced here for the
// same reason.
#pragma GCC diagnostic ignored "-Wpsabi"

// Lanes of m are 0 or -1: picks a where m is set, b elsewhere.
#define SELECT16(m, a, b) ((v16f) (((m) & (v16i) (a)) | (~(m) & (v16i) (b))))
// Lane-wise max; inputs never hold NaN here (non-finite lanes are replaced first).
#define MAX16(a, b)       SELECT16((a) > (b), a, b)
// NaN or +-Inf: all exponent bits set. A bit test, so no compiler flag can drop it.
#define NONFINITE16(v)    (((v16i) (v) & EXPO16) == EXPO16)
#define EXPO16            ((v16i) {} + 0x7f800000)

FSE_INLINE v16f load16(const float * p) {
    v16f v;
    memcpy(&v, p, sizeof(v)); // unaligned load
    return v;
}

FSE_INLINE v16f splat16(float x) {
    return (v16f) {} + x;
}

// exp(p[0..15] - max) for p <= max, ~1 ulp. The argument is clamped to -87 so
// 2^k stays a normal float; such terms add at most n * 1.7e-38 to a sum >= 1.
FSE_INLINE v16f exp16_below(const float * p, float max) {
    const v16f magic = splat16(0x1.8p23f); // adding it rounds to an integer
    v16f t = load16(p) - splat16(max);
    t = MAX16(t, splat16(-87.0f));
    const v16f z = t * splat16(0x1.715476p+0f) + magic; // t * log2(e)
    const v16f k = z - magic;
    // r = t - k*ln2 with ln2 in two parts, so r keeps its low bits.
    const v16f r = (t - k * splat16(0.693359375f)) - k * splat16(-2.12194440e-4f);
    v16f e = splat16(1.9875691500e-4f);
    e = e * r + splat16(1.3981999507e-3f);
    e = e * r + splat16(8.3334519073e-3f);
    e = e * r + splat16(4.1665795894e-2f);
    e = e * r + splat16(1.6666665459e-1f);
    e = e * r + splat16(5.0000001201e-1f);
    e = e * (r * r) + r + splat16(1.0f);
    // Scale by 2^k: z's low mantissa bits hold k; add it to the exponent field.
    const v16i ki = (v16i) z - (v16i) magic;
    return (v16f) ((v16i) e + (ki << 23));
}

FSE_INLINE float hmax16(const v16f * x) {
    float m = (*x)[0];
    for (int i = 1; i < FSE_LANES; i++) {
        m = (*x)[i] > m ? (*x)[i] : m;
    }
    return m;
}

FSE_INLINE double hsum16(const v16f * x) {
    double s = 0.0;
    for (int i = 0; i < FSE_LANES; i++) {
        s += (*x)[i];
    }
    return s;
}

FSE_INLINE double hsum8d(const v8d * x) {
    double s = 0.0;
    for (int i = 0; i < 8; i++) {
        s += (*x)[i];
    }
    return s;
}

// Both sweeps over one block of nvec full vectors. x may be a padded copy;
// start/len locate the block in the caller's logits for the argmax scan.
FSE_INLINE void block_update(stats_state * st, const float * x, int32_t nvec, float shift,
                             int32_t start, int32_t len) {
    float clean[FSE_BLOCK] __attribute__((aligned(64)));
    const v16f ninf    = splat16(-INFINITY);
    const v16f shift16 = splat16(shift);
    const v8d  shift8  = (v8d) {} + (double) shift;

    v16f vmax = ninf;
    for (int32_t i = 0; i < nvec; i++) {
        const v16f v  = load16(x + i * FSE_LANES);
        const v16i bad = NONFINITE16(v);
        st->nonfinite += bad;
        const v16f vm = SELECT16(bad, ninf, v);
        vmax = MAX16(vmax, vm);
        memcpy(clean + i * FSE_LANES, &vm, sizeof(vm));
        // Bad lanes become shift, so they add 0 to both moment sums.
        const v16f vs = SELECT16(bad, shift16, v);
        const v8f  lo = __builtin_shufflevector(vs, vs, 0, 1, 2, 3, 4, 5, 6, 7);
        const v8f  hi = __builtin_shufflevector(vs, vs, 8, 9, 10, 11, 12, 13, 14, 15);
        const v8d  dlo = __builtin_convertvector(lo, v8d) - shift8;
        const v8d  dhi = __builtin_convertvector(hi, v8d) - shift8;
        st->sum_d  += dlo + dhi;
        st->sum_d2 += dlo * dlo + dhi * dhi;
    }

    const float bmax = hmax16(&vmax);
    if (!(bmax > st->max)) {
        if (bmax == -INFINITY) {
            return; // nothing finite here: it adds nothing to the sum
        }
    } else {
        // Online logsumexp: rescale the old sum to the new max (once per raise).
        if (st->max != -INFINITY) {
            st->sumexp *= exp((double) st->max - (double) bmax);
        }
        st->max       = bmax;
        st->max_start = start;
        st->max_len   = len;
    }

    v16f acc0 = {}, acc1 = {};
    int32_t i = 0;
    for (; i + 2 <= nvec; i += 2) { // two chains: shorter float sums
        acc0 += exp16_below(clean + i * FSE_LANES, st->max);
        acc1 += exp16_below(clean + (i + 1) * FSE_LANES, st->max);
    }
    if (i < nvec) {
        acc0 += exp16_below(clean + i * FSE_LANES, st->max);
    }
    st->sumexp += hsum16(&acc0) + hsum16(&acc1);
}

__attribute__((target_clones("avx512f", "avx2,fma", "default")))
static void stats_kernel(const float * logits, int32_t n, float shift, fse_logit_stats * out) {
    stats_state st = {
        .sumexp = 0.0, .max = -INFINITY, .max_start = 0, .max_len = 0,
    };
    const int32_t nfull = n - n % FSE_LANES;
    for (int32_t b = 0; b < nfull; b += FSE_BLOCK) {
        const int32_t len = nfull - b < FSE_BLOCK ? nfull - b : FSE_BLOCK;
        block_update(&st, logits + b, len / FSE_LANES, shift, b, len);
    }
    int32_t pad = 0;
    if (nfull < n) {
        // Tail: a NaN-padded copy, so the vector code never reads past n.
        float tail[FSE_LANES] __attribute__((aligned(64)));
        for (int i = 0; i < FSE_LANES; i++) {
            tail[i] = NAN;
        }
        memcpy(tail, logits + nfull, (size_t) (n - nfull) * sizeof(float));
        pad = FSE_LANES - (n - nfull);
        block_update(&st, tail, 1, shift, nfull, n - nfull);
    }

    int32_t nonfinite = -pad;
    for (int i = 0; i < FSE_LANES; i++) {
        nonfinite -= st.nonfinite[i];
    }
    int32_t argmax = st.max_start;
    while (logits[argmax] != st.max) { // the first index of the max, in its block
        argmax++;
    }

    const double m      = (double) (n - nonfinite);
    const double s      = shift;
    const double sum_d  = hsum8d(&st.sum_d);
    const double sum_d2 = hsum8d(&st.sum_d2);
    const double mean_d = sum_d / m;
    const double var    = sum_d2 / m - mean_d * mean_d;
    // sum(x^2) = sum((s + d)^2); every term is <= 4 m max(x^2), so cancellation
    // costs at most a few m ulps, far below the 1e-5 budget.
    const double sumsq = m * s * s + 2.0 * s * sum_d + sum_d2;

    out->max_logit   = st.max;
    out->argmax      = argmax;
    out->logsumexp   = (double) st.max + log(st.sumexp);
    out->mean        = s + mean_d;
    out->variance    = var > 0.0 ? var : 0.0;
    out->l2_norm     = sqrt(sumsq > 0.0 ? sumsq : 0.0);
    out->n_nonfinite = nonfinite;
}

static int is_finite_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof(bits));
    return (bits & 0x7f800000u) != 0x7f800000u;
}

void fse_logit_stats_compute(const float * logits, int32_t n, fse_logit_stats * out) {
    // The shift for mean/variance is the first finite logit; none means no stats.
    int32_t first = 0;
    while (first < n && !is_finite_bits(logits[first])) {
        first++;
    }
    if (first >= n) {
        out->max_logit   = -INFINITY;
        out->argmax      = -1;
        out->logsumexp   = NAN;
        out->mean        = NAN;
        out->variance    = NAN;
        out->l2_norm     = NAN;
        out->n_nonfinite = n > 0 ? n : 0;
        return;
    }
    stats_kernel(logits, n, logits[first], out);
}
