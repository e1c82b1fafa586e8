// fse_sample.c: llama.cpp's top-k -> top-p -> min-p -> temperature -> dist chain, over
// the k largest logits only.
//
// llama.cpp's chain starts by copying every logit into a candidate array (262,144
// entries of 12 bytes for Gemma 3) and partially sorting it: ~1 ms per stream per step
// on these CPUs, ten times the fused statistics. Every sampler after top-k only sees
// the k survivors, so this file finds them in one read-only pass and runs the rest of
// the chain on at most FSE_TOP_K_MAX entries, with no allocation.
//
// Algorithm: the k largest logits are kept sorted (descending; equal logits by index)
//   in a small array. The pass reads 16 logits at a time and compares them with the
//   k-th largest so far: once the array is full almost every group fails the compare
//   (a loop GCC vectorizes), and the rare survivor is inserted by moving the smaller
//   entries down one place.
//   Then each sampler does exactly what llama-sampler.cpp does on a sorted array, in
//   the same float/double arithmetic and the same order of operations, and the draw
//   uses the same generator: std::mt19937 seeded with the seed, and libstdc++'s
//   uniform_real_distribution<double>(0, 1), i.e. generate_canonical<double, 53>: two
//   32-bit outputs, (a + b * 2^32) / 2^64 in double. So for the same seed and logits
//   the token is the one llama.cpp's chain picks, except where two of the k largest
//   logits are equal (std::partial_sort leaves their order unspecified; here the
//   lower index comes first), which changes nothing in the distribution.
//
// Measured (2-core AMD EPYC, Gemma 3 270M logits, top-k 40): see docs/benchmarks.md.

#include "fse.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MT_N 624
#define MT_M 397
#define GROUP 16 // logits compared with the threshold at a time

typedef float   v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

struct fse_sampler {
    int32_t  top_k;
    float    top_p;
    float    min_p;
    float    temp;
    uint32_t mt[MT_N]; // std::mt19937's state
    int32_t  mti;
    int32_t  ids[FSE_TOP_K_MAX];    // the k largest logits' token ids, largest first
    float    logits[FSE_TOP_K_MAX]; // their logits (divided by temp once it is applied)
    float    p[FSE_TOP_K_MAX];      // softmax scratch (top-p)
};

static void mt_seed(fse_sampler * s, uint32_t seed) {
    s->mt[0] = seed;
    for (int32_t i = 1; i < MT_N; i++) {
        s->mt[i] = 1812433253u * (s->mt[i - 1] ^ (s->mt[i - 1] >> 30)) + (uint32_t) i;
    }
    s->mti = MT_N;
}

static uint32_t mt_next(fse_sampler * s) {
    if (s->mti >= MT_N) {
        for (int32_t i = 0; i < MT_N; i++) {
            const uint32_t y = (s->mt[i] & 0x80000000u) | (s->mt[(i + 1) % MT_N] & 0x7fffffffu);
            s->mt[i] = s->mt[(i + MT_M) % MT_N] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
        }
        s->mti = 0;
    }
    uint32_t y = s->mt[s->mti++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

// libstdc++'s generate_canonical<double, 53>(mt19937): [0, 1).
static double mt_canonical(fse_sampler * s) {
    double sum = 0.0;
    double tmp = 1.0;
    for (int k = 0; k < 2; k++) {
        sum += (double) mt_next(s) * tmp;
        tmp *= 4294967296.0;
    }
    const double ret = sum / tmp;
    return ret >= 1.0 ? nextafter(1.0, 0.0) : ret;
}

fse_sampler * fse_sampler_new(int32_t top_k, float top_p, float min_p, float temp, uint32_t seed) {
    if (top_k < 1 || top_k > FSE_TOP_K_MAX || !(temp > 0.0f)) {
        return NULL;
    }
    fse_sampler * s = malloc(sizeof *s);
    if (s == NULL) {
        return NULL;
    }
    s->top_k = top_k;
    s->top_p = top_p;
    s->min_p = min_p;
    s->temp  = temp;
    mt_seed(s, seed);
    return s;
}

void fse_sampler_free(fse_sampler * s) {
    free(s);
}

// Insert logits[i] into the sorted top list of *m entries (at most k), after any
// equal logit (the lower index stays first).
static inline void insert(fse_sampler * s, int32_t * m, int32_t k, int32_t i, float v) {
    int32_t j = *m < k ? (*m)++ : k - 1;
    while (j > 0 && s->logits[j - 1] < v) {
        s->logits[j] = s->logits[j - 1];
        s->ids[j]    = s->ids[j - 1];
        j--;
    }
    s->logits[j] = v;
    s->ids[j]    = i;
}

// The k largest finite logits, sorted; returns how many (fewer only if n < k).
static int32_t top_k(fse_sampler * s, const float * logits, int32_t n, int32_t k) {
    int32_t m     = 0;
    int32_t i     = 0;
    float   floor = -INFINITY; // the k-th largest once m == k: only larger ones get in
    for (; i < n && m < k; i++) {
        if (isfinite(logits[i])) {
            insert(s, &m, k, i, logits[i]);
        }
    }
    if (m == k) {
        floor = s->logits[k - 1];
    }
    for (; i + GROUP <= n; i += GROUP) {
        // Four 4-float compares OR-ed together: SSE2 on any x86-64, NEON on arm64.
        const v4f lim = {floor, floor, floor, floor};
        v4f       a, b, c, d;
        memcpy(&a, logits + i, sizeof a);
        memcpy(&b, logits + i + 4, sizeof b);
        memcpy(&c, logits + i + 8, sizeof c);
        memcpy(&d, logits + i + 12, sizeof d);
        const v4i over = (a > lim) | (b > lim) | (c > lim) | (d > lim);
        if (!(over[0] | over[1] | over[2] | over[3])) {
            continue;
        }
        for (int32_t j = i; j < i + GROUP; j++) {
            if (logits[j] > floor && logits[j] < INFINITY) {
                insert(s, &m, k, j, logits[j]);
                floor = s->logits[k - 1];
            }
        }
    }
    for (; i < n; i++) {
        if (logits[i] > floor && logits[i] < INFINITY) {
            insert(s, &m, k, i, logits[i]);
            floor = s->logits[k - 1];
        }
    }
    return m;
}

// llama_sampler_top_p_apply on a sorted array: softmax, then the shortest prefix whose
// probabilities add up to p (at least one entry).
static int32_t top_p(fse_sampler * s, int32_t size) {
    if (s->top_p >= 1.0f) {
        return size;
    }
    const float max_l   = s->logits[0];
    float       cum_sum = 0.0f;
    for (int32_t i = 0; i < size; i++) {
        const float p = expf(s->logits[i] - max_l);
        s->p[i]       = p;
        cum_sum += p;
    }
    for (int32_t i = 0; i < size; i++) {
        s->p[i] /= cum_sum;
    }
    float cum = 0.0f;
    for (int32_t i = 0; i < size; i++) {
        cum += s->p[i];
        if (cum >= s->top_p) { // min_keep = 1: i + 1 >= 1 always holds
            return i + 1;
        }
    }
    return size;
}

// llama_sampler_min_p_apply on a sorted array: keep logits >= max + log(p).
static int32_t min_p(fse_sampler * s, int32_t size) {
    if (s->min_p <= 0.0f) {
        return size;
    }
    const float min_logit = s->logits[0] + logf(s->min_p);
    int32_t     i         = 1; // the first always stays
    while (i < size && !(s->logits[i] < min_logit)) {
        i++;
    }
    return i;
}

// llama_sampler_temp_apply (temp > 0) then llama_sampler_dist_apply on a sorted array.
static int32_t dist(fse_sampler * s, int32_t size) {
    for (int32_t i = 0; i < size; i++) {
        s->logits[i] /= s->temp;
    }
    const double rnd = mt_canonical(s); // drawn even for one candidate, as llama.cpp does
    if (size == 1) {
        return 0;
    }
    const float max_l   = s->logits[0];
    double      sum_cum = 0.0;
    for (int32_t i = 0; i < size; i++) {
        const float p = expf(s->logits[i] - max_l);
        s->p[i]       = p;
        sum_cum += p;
    }
    const double sum_tgt = sum_cum * rnd;
    double       sum_run = 0.0;
    for (int32_t i = 0; i < size; i++) {
        sum_run += s->p[i];
        if (sum_run >= sum_tgt) {
            return i;
        }
    }
    return size - 1;
}

int32_t fse_sampler_sample(fse_sampler * s, const float * logits, int32_t n) {
    if (n < 1) {
        return -1; // no logit at all (top_k would read logits[k - 1] with k = 0)
    }
    int32_t size = top_k(s, logits, n, s->top_k < n ? s->top_k : n);
    if (size == 0) {
        return -1; // no finite logit: the non_finite guard has already halted the stream
    }
    size = top_p(s, size);
    size = min_p(s, size);
    return s->ids[dist(s, size)];
}
