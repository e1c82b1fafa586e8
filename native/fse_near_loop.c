// Approximate tail-cycle detector for the `near_loop` guard.
//
// Small models loop with something that changes in every copy: a day or a retry
// counter, a timestamp, a renumbered list item, or (under a repetition penalty)
// one token swapped per copy. fse_loop.c needs every token to repeat exactly and
// misses all of them. Here a lag p is a near loop when the last
// span(p) = max(min_copies * p, min_span) tokens are that many copies of one
// phrase up to a few tokens: of the span(p) - p positions i in that window whose
// token p back is also in it, at least min_match of them have t[i] == t[i - p].
//
// Algorithm: count[p] is the number of matches t[i] == t[i - p] over the window's
// positions, kept incrementally. A push of token i adds its own match and takes
// away the match of the position that just left the window, i - (span(p) - p),
// whose p-back token is i - span(p): two compares per lag, O(max_period) integer
// work per token, no division. need[p] (the least count that reaches min_match,
// found once from min_match in double) turns the test into one integer compare.
// The ring keeps the last max span + 1 tokens, stored twice (as fse_loop.c does)
// so that "k tokens back" is always ring[pos + cap - k] without a modulo.
// A lag is judged only once its window is full (span(p) tokens pushed): a short
// stream is never called a loop on a fraction of a window. The smallest lag that
// passes is reported, as the exact detector does: a multiple of the true period
// passes too, but only later (its window is longer). Period 1 (one token
// repeated) is a near loop like any other; the exact `loop` guard catches it too.
//
// Why this shape:
// - Exact run counters (fse_loop.c) reset on the first mismatch, so one counter
//   token per copy keeps every run shorter than a period. Edit-distance or
//   suffix-structure matchers are heavier and still need a threshold; the
//   fixed lag comparison was what a probe on the embedded model measured: at
//   min_match 0.8-0.85 over max(3p, 24) tokens it caught 6-7 of 7 near-verbatim
//   loops and 6 of 6 exact ones, with 0-1 of 20 ordinary T=0.7 generations
//   flagged. With the defaults (256, 3 copies, 24 tokens, 0.85): 10 of 10 greedy
//   counter loops (match 0.88-0.94; the exact detector caught none), and of the
//   non-looping T=0.7 generations only an ingredient list whose lines differ by
//   one word (docs/guards.md has the whole measurement).
// - Cost: the compares at i - span + p and i - span are strided gathers, so this
//   loop does not vectorize as fse_loop.c's does: 1.1 us per token at max_period
//   256 and 3.6 us at 1024 through the cffi call (fse_loop: 0.6 and 1.5 us), on
//   a shared 2-core x86 machine (bench/bench_kernel.py --near-loop).
// - A window per lag of fixed length (not "since the loop began") keeps the
//   fraction local: a loop that starts after 200 ordinary tokens is caught as
//   soon as min_copies copies are out, not when it outweighs the prefix.
// - Memory is the ring, max(min_copies * max_period, min_span) + 1 ints twice,
//   and three arrays of max_period + 1 ints, all allocated at creation.
#include "fse.h"

#include <stdlib.h>

struct fse_near_loop {
    int32_t   max_period;
    int64_t   n;       // tokens pushed so far
    int64_t   cap;     // ring length: the longest span + 1
    int32_t * ring;    // the last cap tokens, stored twice (see push)
    int32_t * span;    // span[p] = max(min_copies * p, min_span): tokens of p's window
    int32_t * need;    // need[p]: the least count with count / (span - p) >= min_match
    int32_t * count;   // count[p]: matches t[i] == t[i-p] over p's window (index 0 unused)
};

fse_near_loop * fse_near_loop_new(int32_t max_period, int32_t min_copies, int32_t min_span,
                                  double min_match) {
    // The upper bounds keep every span within int32 (4096 * 1000 and 65536 at most).
    if (max_period < 1 || max_period > 4096 || min_copies < 2 || min_copies > 1000 ||
        min_span < 2 || min_span > 65536 || !(min_match > 0.0 && min_match <= 1.0)) {
        return NULL;
    }
    fse_near_loop * nl = calloc(1, sizeof(*nl));
    if (nl == NULL) {
        return NULL;
    }
    const int64_t longest = (int64_t) min_copies * max_period;
    nl->cap        = (longest > min_span ? longest : min_span) + 1;
    nl->max_period = max_period;
    nl->ring       = calloc((size_t) (2 * nl->cap), sizeof(int32_t));
    nl->span       = calloc((size_t) max_period + 1, sizeof(int32_t));
    nl->need       = calloc((size_t) max_period + 1, sizeof(int32_t));
    nl->count      = calloc((size_t) max_period + 1, sizeof(int32_t));
    if (nl->ring == NULL || nl->span == NULL || nl->need == NULL || nl->count == NULL) {
        fse_near_loop_free(nl);
        return NULL;
    }
    for (int32_t p = 1; p <= max_period; p++) {
        const int32_t span  = min_copies * p > min_span ? min_copies * p : min_span;
        const int32_t slots = span - p; // >= p >= 1, since min_copies >= 2
        // The least c with c / slots >= min_match, by the same division the caller sees.
        int32_t c = (int32_t) (min_match * slots);
        while (c > 0 && (double) (c - 1) / slots >= min_match) {
            c--;
        }
        while ((double) c / slots < min_match) {
            c++;
        }
        nl->span[p] = span;
        nl->need[p] = c;
    }
    return nl;
}

void fse_near_loop_free(fse_near_loop * nl) {
    if (nl != NULL) {
        free(nl->ring);
        free(nl->span);
        free(nl->need);
        free(nl->count);
        free(nl);
    }
}

int32_t fse_near_loop_push(fse_near_loop * nl, int32_t token, double * match) {
    const int64_t cap = nl->cap;
    const int64_t pos = nl->n % cap;
    nl->ring[pos]       = token;
    nl->ring[pos + cap] = token;
    const int32_t * back = nl->ring + pos + cap; // back[-k]: the token k pushes ago
    const int64_t   i    = nl->n;                // the new token's position

    int32_t found = 0;
    for (int32_t p = 1; p <= nl->max_period; p++) {
        const int32_t span = nl->span[p];
        // The new position's match, once it has a token p back; and the match of the
        // position leaving the window (i - span + p), once that one was counted.
        const int32_t in  = (p <= i) & (back[-p] == token);
        const int32_t out = (span <= i) && (back[-(span - p)] == back[-span]);
        const int32_t c   = nl->count[p] + in - out;
        nl->count[p]      = c;
        if (found == 0 && span <= i + 1 && c >= nl->need[p]) {
            found = p;
        }
    }
    nl->n++;
    if (match != NULL) {
        *match = found ? (double) nl->count[found] / (nl->span[found] - found) : 0.0;
    }
    return found;
}

int32_t fse_near_loop_best(const fse_near_loop * nl, double * match) {
    int32_t best   = 0;
    double  best_f = 0.0;
    for (int32_t p = 1; p <= nl->max_period && nl->span[p] <= nl->n; p++) {
        const double f = (double) nl->count[p] / (nl->span[p] - p);
        if (f > best_f) {
            best   = p;
            best_f = f;
        }
    }
    if (match != NULL) {
        *match = best_f;
    }
    return best;
}
