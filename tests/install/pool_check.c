// The pthread pool of native/fse_step.c (the build without OpenMP: ggml without it,
// macOS): fse_step over many vectors with 1, 2 and 4 threads must give every vector the
// statistics and token it gets alone. Built and run by test_pool_variant.py.
#include "fse.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { N_VOCAB = 10007, N_JOBS = 13 };

static float logits[N_JOBS][N_VOCAB];

int main(void) {
    uint32_t state = 12345u;
    for (int j = 0; j < N_JOBS; j++) {
        for (int i = 0; i < N_VOCAB; i++) {
            state = state * 1664525u + 1013904223u;
            logits[j][i] = (float) (state >> 8) / (float) (1u << 24) * 20.0f - 10.0f;
        }
    }
    logits[5][77] = NAN;
    fse_step_job alone[N_JOBS];
    for (int j = 0; j < N_JOBS; j++) {
        fse_sampler * s = fse_sampler_new(40, 0.95f, 0.05f, 0.8f, (uint32_t) j);
        fse_logit_stats_compute(logits[j], N_VOCAB, &alone[j].stats);
        alone[j].token = alone[j].stats.n_nonfinite ? alone[j].stats.argmax
                                                    : fse_sampler_sample(s, logits[j], N_VOCAB);
        fse_sampler_free(s);
    }
    const int threads[] = {1, 2, 4};
    for (int t = 0; t < 3; t++) {
        fse_pool * pool = fse_pool_new(threads[t]);
        if (pool == NULL || fse_pool_threads(pool) != threads[t]) {
            fprintf(stderr, "pool of %d threads: not started\n", threads[t]);
            return 1;
        }
        for (int step = 0; step < 3; step++) {
            fse_step_job jobs[N_JOBS];
            fse_sampler * samplers[N_JOBS];
            for (int j = 0; j < N_JOBS; j++) {
                samplers[j]     = fse_sampler_new(40, 0.95f, 0.05f, 0.8f, (uint32_t) j);
                jobs[j].logits  = logits[j];
                jobs[j].sampler = samplers[j];
                jobs[j].token   = -2;
            }
            fse_step(pool, jobs, N_JOBS, N_VOCAB);
            for (int j = 0; j < N_JOBS; j++) {
                fse_sampler_free(samplers[j]);
                if (jobs[j].token != alone[j].token ||
                    memcmp(&jobs[j].stats.logsumexp, &alone[j].stats.logsumexp, sizeof(double)) ||
                    jobs[j].stats.n_nonfinite != alone[j].stats.n_nonfinite) {
                    fprintf(stderr, "threads %d, step %d, job %d differs\n", threads[t], step, j);
                    return 1;
                }
            }
        }
        fse_pool_free(pool);
    }
    puts("ok");
    return 0;
}
