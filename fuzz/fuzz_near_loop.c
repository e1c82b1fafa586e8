// Fuzz target: the approximate loop detector (native/fse_near_loop.c) over arbitrary
// parameters and token id streams.
//
// Invariants: fse_near_loop_new is NULL exactly for the documented bad arguments
// (max_period 1..4096, min_copies 2..1000, min_span 2..65536, 0 < min_match <= 1, NaN
// included); after each push, the period returned is the smallest p whose window is
// full (span(p) = max(min_copies * p, min_span) tokens pushed) and holds at least
// min_match of its span(p) - p positions with t[i] == t[i - p], and the match fraction
// is that period's, 0 and 0 when none qualifies; fse_near_loop_best is the full window
// of the highest fraction (the first on ties), 0 and 0 when none matches at all. All
// checked against a brute force over the whole stream.
#include "fse.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TOKENS 512

static int32_t param(uint8_t b, int32_t small) {
    // Mostly small; the extremes and the bounds around them sometimes.
    switch (b >> 5) {
    case 0: return INT32_MIN + b;
    case 1: return (int32_t) b - 40;
    case 2: return 4096 + (b & 3) - 1;
    case 3: return 65536 + (b & 3) - 1;
    case 4: return 1000 + (b & 3) - 1;
    default: return b % small;
    }
}

static void fail(const char * what, int64_t n, int32_t got, double got_f, int32_t want,
                 double want_f) {
    fprintf(stderr, "push %lld: %s %d (%.17g), brute force %d (%.17g)\n", (long long) n, what,
            got, got_f, want, want_f);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    if (size < 13) {
        return 0;
    }
    const int32_t max_period = param(data[0], 33), min_copies = param(data[1], 7);
    const int32_t min_span = param(data[2], 129);
    double min_match;
    if (data[3] & 1) {
        memcpy(&min_match, data + 4, sizeof min_match); // any bits: NaN, Inf, <= 0, > 1
    } else {
        min_match = (double) data[4] / 200.0; // 0 .. 1.275
    }
    const int alphabet = data[12] % 8 + 1;
    data += 13;
    size -= 13;
    const int bad = max_period < 1 || max_period > 4096 || min_copies < 2 || min_copies > 1000 ||
                    min_span < 2 || min_span > 65536 || !(min_match > 0.0 && min_match <= 1.0);
    // Valid but large parameters allocate megabytes and make the brute force slow: the
    // NULL check below covers their bounds; the streams run with small ones.
    if (!bad && (max_period > 32 || min_copies > 6 || min_span > 128)) {
        return 0;
    }
    fse_near_loop * nl = fse_near_loop_new(max_period, min_copies, min_span, min_match);
    if ((nl == NULL) != bad) {
        fprintf(stderr, "fse_near_loop_new(%d, %d, %d, %g): %p\n", max_period, min_copies,
                min_span, min_match, (void *) nl);
        abort();
    }
    if (nl == NULL) {
        return 0;
    }
    int32_t t[MAX_TOKENS];
    int64_t n = 0;
    for (size_t k = 0; k + 1 < size && n < MAX_TOKENS; k += 2) {
        const int32_t id = data[k + 1] == 0xff ? (int32_t) (data[k] * 16777619u) : data[k] % alphabet;
        t[n++] = id;
        double match = -1.0;
        const int32_t found = fse_near_loop_push(nl, id, &match);
        int32_t want = 0, best = 0;
        double want_f = 0.0, best_f = 0.0;
        for (int32_t p = 1; p <= max_period; p++) {
            const int64_t span = (int64_t) min_copies * p > min_span ? (int64_t) min_copies * p
                                                                     : min_span;
            if (span > n) {
                break; // spans grow with p
            }
            int32_t count = 0;
            for (int64_t j = n - span + p; j < n; j++) {
                count += t[j] == t[j - p];
            }
            const double f = (double) count / (double) (span - p);
            if (want == 0 && f >= min_match) {
                want = p;
                want_f = f;
            }
            if (f > best_f) {
                best = p;
                best_f = f;
            }
        }
        if (found != want || match != want_f) {
            fail("push", n, found, match, want, want_f);
        }
        double got_best_f = -1.0;
        const int32_t got_best = fse_near_loop_best(nl, &got_best_f);
        if (got_best != best || got_best_f != best_f) {
            fail("best", n, got_best, got_best_f, best, best_f);
        }
    }
    fse_near_loop_free(nl);
    return 0;
}
