// Fused logit statistics (scalar placeholder; replaced by the vectorized kernel).
#include "fse.h"

#include <math.h>
#include <string.h>

static int is_finite_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof(bits));
    return (bits & 0x7f800000u) != 0x7f800000u;
}

void fse_logit_stats_compute(const float * logits, int32_t n, fse_logit_stats * out) {
    float   max = -INFINITY;
    int32_t argmax = -1;
    int32_t nonfinite = 0;
    double  shift = 0.0, sum = 0.0, sumsq = 0.0, sq = 0.0;
    int     have_shift = 0;
    for (int32_t i = 0; i < n; i++) {
        const float x = logits[i];
        if (!is_finite_bits(x)) { nonfinite++; continue; }
        if (!have_shift) { shift = x; have_shift = 1; }
        if (argmax < 0 || x > max) { max = x; argmax = i; }
        const double d = (double) x - shift;
        sum += d; sumsq += d * d; sq += (double) x * x;
    }
    const int32_t m = n - nonfinite;
    double se = 0.0;
    for (int32_t i = 0; i < n; i++) {
        if (is_finite_bits(logits[i])) se += exp((double) logits[i] - max);
    }
    out->max_logit = max;
    out->argmax = argmax;
    out->n_nonfinite = nonfinite;
    if (m == 0) {
        out->logsumexp = out->mean = out->variance = out->l2_norm = NAN;
        return;
    }
    const double mean_d = sum / m;
    out->mean = shift + mean_d;
    out->variance = sumsq / m - mean_d * mean_d;
    out->l2_norm = sqrt(sq);
    out->logsumexp = max + log(se);
}
