// Fuzz target: the fused statistics kernel (native/fse_stats.c) over arbitrary float bit
// patterns: NaN payloads, denormals, +-Inf, huge and tiny values, any length up to a few
// blocks (FSE_BLOCK is 2048 floats).
//
// Invariants: n_nonfinite counts exactly the NaN/Inf inputs; with no finite input,
// argmax is -1, max_logit -Inf and every other field NaN; otherwise argmax is the first
// index of the largest finite logit, max_logit that logit, every other field finite, and
// each matches a reference computed here in long double over the finite logits within
// the relative tolerance of tests/core/test_kernel.py (1e-5), plus an absolute one where
// the value may cancel to near 0: 1e-6 nats for entropy and logsumexp, 1e-5 of the
// largest magnitude for the mean, 1e-11 of the squared spread around the first finite
// logit (the kernel's shift) for the variance.
#include "fse.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RTOL 1e-5
#define ENTROPY_ATOL 1e-6
#define MAX_N 8192

static int is_finite_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (bits & 0x7f800000u) != 0x7f800000u;
}

static void fail(const char * what, double got, double want, int32_t n) {
    fprintf(stderr, "fuzz_stats: %s: kernel %.17g, reference %.17g (n = %d)\n", what, got, want, n);
    abort();
}

static void close_to(const char * what, double got, double want, double atol, int32_t n) {
    if (!isfinite(got) || fabs(got - want) > RTOL * fabs(want) + atol) {
        fail(what, got, want, n);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    int32_t n = (int32_t) (size / sizeof(float));
    if (n > MAX_N) {
        n = MAX_N;
    }
    // An exact-size heap copy: ASan catches a read past logits[n-1].
    float * x = malloc((size_t) (n > 0 ? n : 1) * sizeof(float));
    if (x == NULL) {
        return 0;
    }
    memcpy(x, data, (size_t) n * sizeof(float));
    fse_logit_stats got;
    fse_logit_stats_compute(x, n, &got);

    int32_t nonfinite = 0, argmax = -1;
    float top = -INFINITY;
    for (int32_t i = 0; i < n; i++) {
        if (!is_finite_bits(x[i])) {
            nonfinite++;
        } else if (argmax < 0 || x[i] > top) {
            top = x[i];
            argmax = i;
        }
    }
    if (got.n_nonfinite != nonfinite) {
        fail("n_nonfinite", got.n_nonfinite, nonfinite, n);
    }
    if (got.argmax != argmax) {
        fail("argmax", got.argmax, argmax, n);
    }
    if (argmax < 0) {
        if (got.max_logit != -INFINITY || !isnan(got.logsumexp) || !isnan(got.entropy) ||
            !isnan(got.mean) || !isnan(got.variance) || !isnan(got.l2_norm)) {
            fail("no finite logit: not flagged", got.max_logit, -INFINITY, n);
        }
        free(x);
        return 0;
    }
    if (got.max_logit != top) {
        fail("max_logit", got.max_logit, top, n);
    }
    long double m = 0, sum = 0, sumexp = 0, sum_et = 0, sumsq = 0;
    for (int32_t i = 0; i < n; i++) {
        if (is_finite_bits(x[i])) {
            const long double v = x[i], t = v - top, e = expl(t);
            m += 1;
            sum += v;
            sumexp += e;
            sum_et += e * t;
            sumsq += v * v;
        }
    }
    const long double mean = sum / m;
    long double var = 0;
    for (int32_t i = 0; i < n; i++) {
        if (is_finite_bits(x[i])) {
            var += (x[i] - mean) * (x[i] - mean);
        }
    }
    var /= m;
    const long double entropy = logl(sumexp) - sum_et / sumexp;
    // The mean's error is relative to the largest magnitude, not to a mean that cancels.
    // The variance's, to the spread around the first finite logit (the kernel's shift):
    // 1e6 + N(0, 1) keeps its variance to 1e-5.
    long double scale = 0, spread = 0, first = x[argmax];
    for (int32_t i = 0; i < n; i++) {
        if (is_finite_bits(x[i])) {
            first = x[i];
            break;
        }
    }
    for (int32_t i = 0; i < n; i++) {
        if (is_finite_bits(x[i])) {
            scale = fabsl(x[i]) > scale ? fabsl(x[i]) : scale;
            spread = fabsl(x[i] - first) > spread ? fabsl(x[i] - first) : spread;
        }
    }
    // log(sumexp) is in [0, log n]: its error is absolute (the exps' relative error, and
    // double's rounding of a sum near 1), while logsumexp itself may be near 0.
    close_to("logsumexp", got.logsumexp, (double) (top + logl(sumexp)), ENTROPY_ATOL, n);
    close_to("mean", got.mean, (double) mean, (double) (RTOL * scale), n);
    close_to("variance", got.variance, (double) var, (double) (1e-11 * spread * spread), n);
    close_to("l2_norm", got.l2_norm, (double) sqrtl(sumsq), 0, n);
    close_to("entropy", got.entropy, (double) entropy, ENTROPY_ATOL, n);
    free(x);
    return 0;
}
