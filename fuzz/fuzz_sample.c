// Fuzz target: the sampler (native/fse_sample.c), whose parameters come from the client
// (top_k, top_p, min_p, temperature, seed), over arbitrary logits (any float bits).
//
// Invariants: fse_sampler_new is NULL exactly unless 1 <= top_k <= FSE_TOP_K_MAX and
// temp > 0; a draw is -1 exactly when no logit is finite, else the index of a finite logit
// among the top_k largest finite ones (no larger finite logit is left out but for ties),
// and the same seed draws the same token.
#include "fse.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_N 4096

static float f32(const uint8_t * p) {
    float f;
    memcpy(&f, p, sizeof f);
    return f;
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    if (size < 18) {
        return 0;
    }
    const int32_t top_k = (int8_t) data[0] == -128 ? 100000 : (int8_t) data[0];
    const float top_p = data[1] & 1 ? f32(data + 2) : (float) data[2] / 200.0f;
    const float min_p = data[1] & 2 ? f32(data + 6) : (float) data[6] / 200.0f;
    const float temp = data[1] & 4 ? f32(data + 10) : (float) data[10] / 50.0f;
    uint32_t seed;
    memcpy(&seed, data + 14, sizeof seed);
    data += 18;
    size -= 18;
    int32_t n = (int32_t) (size / sizeof(float));
    n = n > MAX_N ? MAX_N : n;
    float * x = malloc((size_t) (n > 0 ? n : 1) * sizeof(float)); // exact size: ASan
    memcpy(x, data, (size_t) n * sizeof(float));

    const int valid = top_k >= 1 && top_k <= FSE_TOP_K_MAX && temp > 0.0f;
    fse_sampler * a = fse_sampler_new(top_k, top_p, min_p, temp, seed);
    fse_sampler * b = fse_sampler_new(top_k, top_p, min_p, temp, seed);
    if ((a != NULL) != valid || (b != NULL) != valid) {
        fprintf(stderr, "fse_sampler_new(%d, %g, %g, %g): %p\n", top_k, top_p, min_p, temp,
                (void *) a);
        abort();
    }
    if (a == NULL) {
        free(x);
        return 0;
    }
    int finite = 0;
    for (int32_t i = 0; i < n; i++) {
        finite += isfinite(x[i]) != 0;
    }
    for (int round = 0; round < 3; round++) {
        const int32_t t = fse_sampler_sample(a, x, n);
        if (t != fse_sampler_sample(b, x, n)) {
            fprintf(stderr, "the same seed drew two tokens\n");
            abort();
        }
        if (finite == 0) {
            if (t != -1) {
                fprintf(stderr, "no finite logit, token %d\n", t);
                abort();
            }
            continue;
        }
        if (t < 0 || t >= n || !isfinite(x[t])) {
            fprintf(stderr, "token %d of %d (finite: %d)\n", t, n, finite);
            abort();
        }
        int32_t above = 0; // finite logits strictly larger than the one drawn
        for (int32_t i = 0; i < n; i++) {
            above += isfinite(x[i]) && x[i] > x[t];
        }
        if (above >= top_k) {
            fprintf(stderr, "token %d has %d larger logits, top_k %d\n", t, above, top_k);
            abort();
        }
    }
    fse_sampler_free(a);
    fse_sampler_free(b);
    free(x);
    return 0;
}
