// fse_stats_width.h: the vector kernel of fse_stats.c for FSE_W float lanes.
//
// Not a header of its own: fse_stats.c includes it once per vector width, with
// FSE_W (16, 8 or 4) and FSE_TARGET (the instruction set) defined and its
// helpers (stats_state, SELECT, MAX, NONFINITE, raise_max, FSE_CAT) in scope.
// Every name defined here is suffixed with the width and undefined at the end,
// so the next inclusion starts clean. Hence no include guard.

#ifndef FSE_W
#error "fse_stats_width.h is included by fse_stats.c with FSE_W set"
#endif

// Each instantiation gets its own names.
#define vf               FSE_CAT(vf, FSE_W)
#define vi               FSE_CAT(vi, FSE_W)
#define vd               FSE_CAT(vd, FSE_W)
#define vl               FSE_CAT(vl, FSE_W)
#define moments          FSE_CAT(moments, FSE_W)
#define load_vf          FSE_CAT(load_vf, FSE_W)
#define splat_vf         FSE_CAT(splat_vf, FSE_W)
#define load_half_double FSE_CAT(load_half_double, FSE_W)
#define exp_below        FSE_CAT(exp_below, FSE_W)
#define hmax_vf          FSE_CAT(hmax_vf, FSE_W)
#define hsum_vf          FSE_CAT(hsum_vf, FSE_W)
#define hsum_vd          FSE_CAT(hsum_vd, FSE_W)
#define any_nonfinite_vd FSE_CAT(any_nonfinite_vd, FSE_W)
#define add_moments      FSE_CAT(add_moments, FSE_W)
#define fold_moments     FSE_CAT(fold_moments, FSE_W)
#define sweep1_fast      FSE_CAT(sweep1_fast, FSE_W)
#define sweep1_careful   FSE_CAT(sweep1_careful, FSE_W)
#define sweep2_sumexp    FSE_CAT(sweep2_sumexp, FSE_W)
#define exp_sums         FSE_CAT(exp_sums, FSE_W)
#define block_update     FSE_CAT(block_update, FSE_W)
#define stats_blocks     FSE_CAT(stats_blocks, FSE_W)

typedef float   vf __attribute__((vector_size(4 * FSE_W)));
typedef int32_t vi __attribute__((vector_size(4 * FSE_W)));
typedef double  vd __attribute__((vector_size(4 * FSE_W))); // half a vf's lanes
typedef int64_t vl __attribute__((vector_size(4 * FSE_W)));

// Per-lane moments of a block around the shift; lo/hi: the two halves of vf.
typedef struct moments {
    vd d_lo, d_hi;   // sum of (x - shift)
    vd d2_lo, d2_hi; // sum of (x - shift)^2
} moments;

FSE_INLINE vf load_vf(const float * p) {
    vf v;
    memcpy(&v, p, sizeof(v)); // unaligned load
    return v;
}

FSE_INLINE vf splat_vf(float x) {
    return (vf) {0} + x;
}

// Half a vector of floats at p, widened. Written lane by lane: GCC turns this
// into one vcvtps2pd from memory, and __builtin_convertvector into up to four.
FSE_INLINE vd load_half_double(const float * p) {
#if FSE_W == 16
    return (vd) { p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7] };
#elif FSE_W == 8
    return (vd) { p[0], p[1], p[2], p[3] };
#else
    return (vd) { p[0], p[1] };
#endif
}

// exp(t) for t = p[i] - max <= 0, and t in *t_out. t is clamped to -87 so 2^k
// stays a normal float; such terms add at most n * 1.7e-38 to a sum that is >= 1
// (and at most n * 87 * 1.7e-38 to the sum of exp(t) * t).
FSE_INLINE vf exp_below(const float * p, float max, vf * t_out) {
    const vf magic = splat_vf(0x1.8p23f); // adding it rounds to an integer
    vf t = load_vf(p) - splat_vf(max);
    t = MAX(t, splat_vf(-87.0f));
    *t_out = t;
    const vf z = t * splat_vf(0x1.715476p+0f) + magic; // round(t * log2(e)) + magic
    const vf k = z - magic;
    const vf f = t * splat_vf(0x1.715476p+0f) - k; // gnu11 contracts it to an fma
    vf e = splat_vf(0x1.5ce202p-10f);              // 2^f, f in [-1/2, 1/2]
    e = e * f + splat_vf(0x1.3cea90p-7f);
    e = e * f + splat_vf(0x1.c6b426p-5f);
    e = e * f + splat_vf(0x1.ebf9bcp-3f);
    e = e * f + splat_vf(0x1.62e42cp-1f);
    e = e * f + splat_vf(1.0f); // exactly 1 at f = 0, so exp(0) = 1
    // Scale by 2^k: z's low mantissa bits hold k, and magic's low 9 bits are 0,
    // so z << 23 is k << 23: add it to the exponent field.
    return (vf) ((vi) e + ((vi) z << 23));
}

FSE_INLINE float hmax_vf(const vf * x) {
    float m = (*x)[0];
    for (int i = 1; i < FSE_W; i++) {
        m = (*x)[i] > m ? (*x)[i] : m;
    }
    return m;
}

FSE_INLINE double hsum_vf(const vf * x) {
    double s = 0.0;
    for (int i = 0; i < FSE_W; i++) {
        s += (*x)[i];
    }
    return s;
}

FSE_INLINE double hsum_vd(const vd * x) {
    double s = 0.0;
    for (int i = 0; i < FSE_W / 2; i++) {
        s += (*x)[i];
    }
    return s;
}

FSE_INLINE int any_nonfinite_vd(const vd * x) {
    const vl expo = (vl) {0} + 0x7ff0000000000000;
    const vl bad  = ((vl) *x & expo) == expo;
    int64_t  any  = 0;
    for (int i = 0; i < FSE_W / 2; i++) {
        any |= bad[i];
    }
    return any != 0;
}

// Adds the FSE_W floats at p to the moments, in double: (x - shift) is exact.
FSE_INLINE void add_moments(moments * mo, const float * p, const vd * shift) {
    const vd d_lo = load_half_double(p) - *shift;
    const vd d_hi = load_half_double(p + FSE_W / 2) - *shift;
    mo->d_lo += d_lo;
    mo->d_hi += d_hi;
    mo->d2_lo += d_lo * d_lo;
    mo->d2_hi += d_hi * d_hi;
}

// Folds a block's moments into the running sums.
FSE_INLINE void fold_moments(stats_state * st, const moments * mo) {
    const vd d  = mo->d_lo + mo->d_hi;
    const vd d2 = mo->d2_lo + mo->d2_hi;
    st->sum_d += hsum_vd(&d);
    st->sum_d2 += hsum_vd(&d2);
}

// Sweep 1, common case: max and moments of the nvec vectors at x. Returns 0 if
// the block holds a NaN or Inf; *mo and *max are then garbage and the caller
// redoes the block with sweep1_careful. The test costs nothing per element:
// x - shift is finite in double for every finite float x, so a lane of
// sum(x - shift) is finite exactly when every x added to it was (an Inf or
// NaN term makes the sum Inf or NaN for good).
FSE_INLINE int sweep1_fast(const float * x, int32_t nvec, float shift, moments * mo, float * max) {
    const vd shift_d = (vd) {0} + (double) shift;
    vf       vmax    = splat_vf(-INFINITY);
    for (int32_t i = 0; i < nvec; i++) {
        const float * p = x + i * FSE_W;
        const vf      v = load_vf(p);
        vmax = MAX(v, vmax);
        add_moments(mo, p, &shift_d);
    }
    if (any_nonfinite_vd(&mo->d_lo) || any_nonfinite_vd(&mo->d_hi)) {
        return 0;
    }
    *max = hmax_vf(&vmax);
    return 1;
}

// Sweep 1 for a block with NaN/Inf: counts them, keeps them out of the max and
// the moments, and writes the block to clean with -Inf in their place.
FSE_INLINE float sweep1_careful(const float * x, int32_t nvec, float shift, moments * mo,
                                int32_t * nonfinite, float * clean) {
    const vf ninf    = splat_vf(-INFINITY);
    const vf shift_f = splat_vf(shift);
    const vd shift_d = (vd) {0} + (double) shift;
    vf       vmax    = ninf;
    vi       count   = {0}; // negated: true masks are -1
    for (int32_t i = 0; i < nvec; i++) {
        const vf v   = load_vf(x + i * FSE_W);
        const vi bad = NONFINITE(v);
        count += bad;
        const vf vm = SELECT(bad, ninf, v);
        vmax = MAX(vm, vmax);
        memcpy(clean + i * FSE_W, &vm, sizeof(vm));
        // Bad lanes become shift, so they add 0 to the moments.
        const vf vs = SELECT(bad, shift_f, v);
        float    s[FSE_W];
        memcpy(s, &vs, sizeof(vs));
        add_moments(mo, s, &shift_d);
    }
    for (int i = 0; i < FSE_W; i++) {
        *nonfinite -= count[i];
    }
    return hmax_vf(&vmax);
}

typedef struct exp_sums {
    double e;  // sum of exp(x - max)
    double et; // sum of exp(x - max) * (x - max), for the entropy
} exp_sums;

// Sweep 2: the sums of exp(x - max) and exp(x - max) * (x - max) over the nvec
// vectors at x (all <= max or -Inf). The second costs one multiply-add per logit
// on data already in registers.
FSE_INLINE exp_sums sweep2_sumexp(const float * x, int32_t nvec, float max) {
    // Four chains: more in flight, and a quarter of the terms per float sum.
    vf      acc[4] = {{0}}, acc_t[4] = {{0}};
    vf      t;
    int32_t i = 0;
    for (; i + 4 <= nvec; i += 4) {
        for (int j = 0; j < 4; j++) {
            const vf e = exp_below(x + (i + j) * FSE_W, max, &t);
            acc[j] += e;
            acc_t[j] += e * t;
        }
    }
    for (; i < nvec; i++) {
        const vf e = exp_below(x + i * FSE_W, max, &t);
        acc[0] += e;
        acc_t[0] += e * t;
    }
    const vf sum   = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    const vf sum_t = (acc_t[0] + acc_t[1]) + (acc_t[2] + acc_t[3]);
    return (exp_sums) {hsum_vf(&sum), hsum_vf(&sum_t)};
}

// One block of nvec full vectors at x, which is logits + start or a padded copy.
FSE_INLINE void block_update(stats_state * st, const float * x, int32_t nvec, float shift,
                             int32_t start) {
    float   clean[FSE_BLOCK] __attribute__((aligned(64)));
    moments mo = {0};
    float   bmax;
    if (!sweep1_fast(x, nvec, shift, &mo, &bmax)) {
        mo   = (moments) {0};
        bmax = sweep1_careful(x, nvec, shift, &mo, &st->nonfinite, clean);
        x    = clean;
    }
    fold_moments(st, &mo);
    if (bmax == -INFINITY) {
        return; // nothing finite: adds nothing to the sum
    }
    raise_max(st, bmax, start);
    const exp_sums sums = sweep2_sumexp(x, nvec, st->max);
    st->sumexp += sums.e;
    st->sum_et += sums.et;
}

// All of the n logits: full blocks, then the tail.
FSE_TARGET static void stats_blocks(const float * logits, int32_t n, float shift, stats_state * st) {
    const int32_t nfull = n - n % FSE_W;
    for (int32_t b = 0; b < nfull; b += FSE_BLOCK) {
        const int32_t len = nfull - b < FSE_BLOCK ? nfull - b : FSE_BLOCK;
        block_update(st, logits + b, len / FSE_W, shift, b);
    }
    if (nfull < n) {
        // The tail as a NaN-padded copy, so the vector code never reads past n.
        float tail[FSE_W];
        for (int i = 0; i < FSE_W; i++) {
            tail[i] = NAN;
        }
        memcpy(tail, logits + nfull, (size_t) (n - nfull) * sizeof(float));
        block_update(st, tail, 1, shift, nfull);
        st->nonfinite -= FSE_W - (n - nfull);
    }
}

#undef vf
#undef vi
#undef vd
#undef vl
#undef moments
#undef load_vf
#undef splat_vf
#undef load_half_double
#undef exp_below
#undef hmax_vf
#undef hsum_vf
#undef hsum_vd
#undef any_nonfinite_vd
#undef add_moments
#undef fold_moments
#undef sweep1_fast
#undef sweep1_careful
#undef sweep2_sumexp
#undef exp_sums
#undef block_update
#undef stats_blocks

