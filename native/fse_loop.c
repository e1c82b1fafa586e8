// Tail-cycle detector for the `loop` guard.
//
// run[p] counts how many of the most recent tokens t[i] equal t[i-p]; the tail
// is then periodic with period p over run[p] + p tokens. Each push updates every
// run in O(max_period), which stays in cache and vectorizes, so the cost per
// token is bounded whatever the text looks like.
#include "fse.h"

#include <stdlib.h>

struct fse_loop {
    int32_t   max_period;
    int32_t   min_repeats;
    int32_t   min_span;
    int64_t   n;       // tokens pushed so far
    int32_t * history; // the last max_period+1 tokens, stored twice (see push)
    int32_t * run;     // run[p] for p in 1..max_period (run[0] unused)
};

fse_loop * fse_loop_new(int32_t max_period, int32_t min_repeats, int32_t min_span) {
    if (max_period < 1 || min_repeats < 2 || min_span < 2) {
        return NULL;
    }
    fse_loop * loop = calloc(1, sizeof(*loop));
    if (loop == NULL) {
        return NULL;
    }
    const size_t cap = (size_t) max_period + 1;
    loop->history = calloc(2 * cap, sizeof(int32_t));
    loop->run     = calloc(cap, sizeof(int32_t));
    if (loop->history == NULL || loop->run == NULL) {
        fse_loop_free(loop);
        return NULL;
    }
    loop->max_period  = max_period;
    loop->min_repeats = min_repeats;
    loop->min_span    = min_span;
    return loop;
}

void fse_loop_free(fse_loop * loop) {
    if (loop != NULL) {
        free(loop->history);
        free(loop->run);
        free(loop);
    }
}

int32_t fse_loop_push(fse_loop * loop, int32_t token, int32_t * span) {
    const int64_t cap = (int64_t) loop->max_period + 1;
    const int64_t pos = loop->n % cap;
    // Each token is written at pos and pos+cap, so the p-th previous token is
    // always history[pos + cap - p]: one contiguous slice, no modulo per period.
    loop->history[pos]       = token;
    loop->history[pos + cap] = token;
    const int32_t * prev  = loop->history + pos + cap;
    const int64_t   known = loop->n; // periods longer than this have no previous token yet

    int32_t found = 0;
    int32_t found_span = 0;
    for (int32_t p = 1; p <= loop->max_period; p++) {
        const int32_t r = (p <= known && prev[-p] == token) ? loop->run[p] + 1 : 0;
        loop->run[p] = r;
        const int64_t covered = (int64_t) r + p;
        if (found == 0 && r > 0 && covered >= (int64_t) loop->min_repeats * p &&
            covered >= loop->min_span) {
            found      = p;
            found_span = (int32_t) covered;
        }
    }
    loop->n++;
    if (span != NULL) {
        *span = found_span;
    }
    return found;
}
