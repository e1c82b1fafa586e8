// Fuzz target: the loop detector (native/fse_loop.c) over arbitrary token id streams and
// parameters.
//
// Invariants: fse_loop_new is NULL exactly for the documented bad arguments; each push
// returns 0 or the smallest period p <= max_period such that the tail is periodic with
// period p over span >= max(min_repeats * p, min_span) tokens, with span the longest such
// tail (checked here by brute force over the whole stream), and 0 when no period qualifies.
#include "fse.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TOKENS 4096

// Length of the longest tail of t[0..n) periodic with period p (t[i] == t[i-p]), plus p.
static int64_t periodic_tail(const int32_t * t, int64_t n, int32_t p) {
    if (p > n - 1) {
        return 0;
    }
    int64_t r = 0;
    while (n - 1 - r - p >= 0 && t[n - 1 - r] == t[n - 1 - r - p]) {
        r++;
    }
    return r > 0 ? r + p : 0;
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    if (size < 6) {
        return 0;
    }
    // Small parameters mostly, so loops are found; any value sometimes.
    int32_t params[3];
    for (int i = 0; i < 3; i++) {
        const int8_t b = (int8_t) data[i];
        params[i] = b == -128 ? INT32_MIN : b == 127 ? INT32_MAX : b;
    }
    const int32_t max_period = params[0], min_repeats = params[1], min_span = params[2];
    const int alphabet = data[3] % 8 + 1; // few distinct ids make cycles likely
    data += 4;
    size -= 4;
    const int bad = max_period < 1 || min_repeats < 2 || min_span < 2;
    // A huge max_period allocates 8 bytes per period: keep it to what a policy allows.
    if (!bad && max_period > 4096) {
        return 0;
    }
    fse_loop * loop = fse_loop_new(max_period, min_repeats, min_span);
    if ((loop == NULL) != bad) {
        fprintf(stderr, "fse_loop_new(%d, %d, %d): %p\n", max_period, min_repeats, min_span,
                (void *) loop);
        abort();
    }
    if (loop == NULL) {
        return 0;
    }
    int32_t * t = malloc(MAX_TOKENS * sizeof(int32_t));
    int64_t n = 0;
    for (size_t i = 0; i + 1 < size && n < MAX_TOKENS; i += 2) {
        int32_t id = data[i] % alphabet;
        if (data[i + 1] == 0xff) {
            id = (int32_t) (data[i] * 16777619u); // any id, negative ones too
        }
        t[n++] = id;
        int32_t span = -1;
        const int32_t found = fse_loop_push(loop, id, &span);
        int32_t want = 0;
        int64_t want_span = 0;
        for (int32_t p = 1; p <= max_period && p < n; p++) {
            const int64_t covered = periodic_tail(t, n, p);
            if (covered > 0 && covered >= (int64_t) min_repeats * p && covered >= min_span) {
                want = p;
                want_span = covered;
                break;
            }
        }
        if (found != want || (want != 0 && span != want_span) || (want == 0 && span != 0)) {
            fprintf(stderr, "push %lld: period %d span %d, brute force %d span %lld\n",
                    (long long) n, found, span, want, (long long) want_span);
            abort();
        }
    }
    free(t);
    fse_loop_free(loop);
    return 0;
}
