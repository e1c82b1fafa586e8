// fse_graph_stats.c: a step's logit statistics as ops in llama.cpp's own compute graph.
//
// The host path (fse_stats.c) reads every stream's n_vocab logits after each decode:
// on a GPU that is 1 MiB per stream per step copied back (262,144 floats for Gemma 3),
// then a pass over it on the CPU, while the GPU waits for the next batch. llama.cpp's
// backend sampling API (EXPERIMENTAL in the pinned version) lets a sampler chain add
// ops to the decode graph, on the device that holds the output layer, and copies back
// only the tensors the chain leaves in its llama_sampler_data. This file is such a
// chain: its statistics travel back as FSE_GRAPH_STATS_N floats and the sampled token,
// 40 bytes a step instead of 1 MiB.
//
// The chain, one per stream, attached with llama_set_sampler(ctx, seq, chain):
//   head  records the logits row (after the debug fault ops, when asked for them);
//   then llama.cpp's own backend samplers, as the host chain (fse.core.engine):
//         top_k -> top_p -> min_p -> temp -> dist, or nothing for greedy;
//   tail  builds the statistics on the row the head recorded, and the logit of the
//         sampled token (the argmax when greedy), then sets data->logits to the small
//         statistics vector and drops data->probs and data->candidates.
// Why two samplers: the statistics need the raw row, which the truncating samplers
// replace (top_k leaves k logits), and only the last sampler decides what is copied
// back (llm_graph_context::build_sampling in src/llama-graph.cpp copies whatever
// data.logits/probs/sampled/candidates are after the whole chain; dist leaves
// probs over all it saw, 1 MiB again). The two share one state, freed with the
// second of them. The raw logits are then not copied at all: needs_raw_logits() in
// src/llama-context.cpp skips them when every output of the ubatch belongs to a
// sequence with a backend sampler.
//
// The ops, over the row z of n logits (every one an ordinary ggml op, so any backend
// that runs them can; the tail checks them with ggml_backend_dev_supports_op):
//   a = argmax(z), M = z[a]                     (get_rows of the argmax)
//   t = z - M, e = exp(t): S = sum(e), T = sum(e * t)
//   mean = mean(z)                              (not M + m: a mean near 0 keeps its digits)
//   m = mean(t), V = mean((t - m)^2)            (two passes: no cancellation)
//   probe = sum(z - z)                          NaN iff some z is NaN or +-Inf
//   finite = sum(step((z - z) + 1))             how many z are finite
//   zs = z[sampled]
// and the host turns these into the fused kernel's fields in double:
//   logsumexp = M + log S, entropy = log S - T / S (both terms >= 0, as in
//   fse_stats.c), variance = V, L2 = sqrt(n (V + mean^2)) (a sum of
//   two terms >= 0, so exact up to their rounding), nll = logsumexp - zs.
// Non-finite values: a NaN or an Inf makes z - z NaN there and 0 elsewhere, so the
// probe sum is NaN exactly when one is present, on any IEEE backend, in any summation
// order: it cannot be averaged away. The count uses step(), which is 0 for NaN on the
// CPU and CUDA backends; where a backend's step() said otherwise the count could read
// 0 while the probe is NaN, and the host then reports 1 (detected, count unknown).
// Unlike the host kernel the other statistics are then NaN, not those of the finite
// logits: the non_finite guard, checked first, halts the step either way.
//
// Precision: float32 ops in the backend's order. On the CPU backend ggml_sum and
// ggml_mean add in double, so the results agree with the float64 reference to about
// 1e-6 relative (tests/core/test_graph_stats.py states the tolerances it checks).
// Ties: the device's argmax decides (ggml-cpu keeps the last of equal maxima, llama.cpp's
// host greedy and fse_stats.c the first); real logits almost never tie at the top.
//
// Debug faults (fse.core.faults) cannot write into logits that never reach the host,
// so a chain made with faults = 1 applies them as ops in the head: z * scale, then
// + add_mid at n / 2 and + add_last at n - 1 (ggml_acc), from a 3-float input set
// before each decode (fse_graph_sampler_set_fault; 1, 0, 0 leaves z as it is). The
// ops cost a copy of the row, so a chain without faults has none.
//
// A context for this path is made with n_outputs_max_per_seq = 1 (one output per
// sequence and step, what generation asks): llama.cpp's dist sampler is then not
// "transactional" and draws its uniform from its own generator at every step, with no
// llama_sampler_accept needed, and the sampling graph stays one row per stream.
//
// Built only where llama.h has that API (build_native.py defines FSE_GRAPH_STATS);
// elsewhere every entry point reports it unavailable and the engine stays on the host
// kernel.

#include "fse.h"

#include <math.h>
#include <stdlib.h>

#if FSE_GRAPH_STATS

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

// State shared by the head and the tail of one chain.
typedef struct graph_state {
    int                  refs;      // the head and the tail each hold one
    int                  faults;    // build the debug fault ops
    int                  supported; // the tail ran backend_init and the device runs every op
    float                fault[3];  // scale, added at n / 2, added at n - 1
    struct ggml_tensor * fault_in;  // the fault input of the graph built last
    struct ggml_tensor * logits;    // the row the head saw last, for the tail
} graph_state;

struct fse_graph_sampler {
    struct llama_sampler * chain; // owns the head, llama.cpp's samplers and the tail
    graph_state *          st;    // freed with the chain
    int                    used;  // llama_set_sampler ran it through backend_init once
};

// --- the ops ----------------------------------------------------------------------------

// The fault ops over the row z (n floats), from the 3-float input fault_in.
static struct ggml_tensor * build_faults(struct ggml_context * ctx, struct ggml_tensor * z,
                                         struct ggml_tensor * fault_in) {
    const int64_t n  = ggml_nelements(z);
    const size_t  fs = sizeof(float);
    z = ggml_mul(ctx, z, ggml_view_1d(ctx, fault_in, 1, 0));
    z = ggml_acc(ctx, z, ggml_view_1d(ctx, fault_in, 1, fs), z->nb[1], z->nb[2], z->nb[3],
                 (size_t) (n / 2) * fs);
    z = ggml_acc(ctx, z, ggml_view_1d(ctx, fault_in, 1, 2 * fs), z->nb[1], z->nb[2], z->nb[3],
                 (size_t) (n - 1) * fs);
    ggml_set_name(z, "fse_fault_logits");
    return z;
}

// The statistics of the row z, as FSE_GRAPH_STATS_N floats (the order fse_graph_stats_read
// reads), and *sampled: the argmax when it comes in NULL.
static struct ggml_tensor * build_stats(struct ggml_context * ctx, struct ggml_tensor * z,
                                        struct ggml_tensor ** sampled) {
    const int64_t n = ggml_nelements(z);
    z               = ggml_reshape_1d(ctx, z, n);
    struct ggml_tensor * rows = ggml_reshape_2d(ctx, z, 1, n);

    struct ggml_tensor * am = ggml_argmax(ctx, z);
    struct ggml_tensor * mx = ggml_get_rows(ctx, rows, am);
    struct ggml_tensor * t  = ggml_sub(ctx, z, mx);
    struct ggml_tensor * e  = ggml_exp(ctx, t);
    struct ggml_tensor * s  = ggml_sum(ctx, e);
    struct ggml_tensor * st = ggml_sum(ctx, ggml_mul(ctx, e, t));
    struct ggml_tensor * mz = ggml_mean(ctx, z);
    struct ggml_tensor * m  = ggml_mean(ctx, t);
    struct ggml_tensor * v  = ggml_mean(ctx, ggml_sqr(ctx, ggml_sub(ctx, t, m)));
    struct ggml_tensor * zz = ggml_sub(ctx, z, z);
    struct ggml_tensor * pr = ggml_sum(ctx, zz);
    struct ggml_tensor * fi = ggml_sum(ctx, ggml_step(ctx, ggml_scale_bias(ctx, zz, 1.0f, 1.0f)));

    if (*sampled == NULL) {
        *sampled = am;
    }
    struct ggml_tensor * tok = ggml_reshape_1d(ctx, *sampled, ggml_nelements(*sampled));
    struct ggml_tensor * zs  = ggml_get_rows(ctx, rows, tok);

    struct ggml_tensor * parts[FSE_GRAPH_STATS_N] = {
        mx, ggml_cast(ctx, am, GGML_TYPE_F32), s, st, mz, v, pr, fi, zs,
    };
    struct ggml_tensor * out = ggml_reshape_1d(ctx, parts[0], 1);
    for (int i = 1; i < FSE_GRAPH_STATS_N; i++) {
        out = ggml_concat(ctx, out, ggml_reshape_1d(ctx, parts[i], 1), 0);
    }
    ggml_set_name(out, "fse_stats");
    return out;
}

// Tensor metadata for a standalone graph of at most GRAPH_NODES nodes (no data: the
// tensors live in a backend buffer or are never computed).
enum { GRAPH_NODES = 128 };

static struct ggml_context * graph_meta_init(void) {
    struct ggml_init_params params = {
        .mem_size   = GRAPH_NODES * ggml_tensor_overhead() +
                      ggml_graph_overhead_custom(GRAPH_NODES, false),
        .mem_buffer = NULL,
        .no_alloc   = true,
    };
    return ggml_init(params);
}

// Whether the device behind buft runs every op of the head (with faults) and the tail.
static int device_runs_ops(ggml_backend_buffer_type_t buft, int faults) {
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    if (dev == NULL) {
        return 1; // the CPU buffer type: ggml-cpu runs every op above
    }
    struct ggml_context * ctx = graph_meta_init();
    if (ctx == NULL) {
        return 0;
    }
    struct ggml_cgraph * gf      = ggml_new_graph_custom(ctx, GRAPH_NODES, false);
    struct ggml_tensor * z       = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 128 * 1024);
    struct ggml_tensor * sampled = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 1);
    if (faults) {
        z = build_faults(ctx, z, ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 3));
    }
    ggml_build_forward_expand(gf, build_stats(ctx, z, &sampled));
    int ok = 1;
    for (int i = 0; ok && i < ggml_graph_n_nodes(gf); i++) {
        ok = ggml_backend_dev_supports_op(dev, ggml_graph_node(gf, i));
    }
    ggml_free(ctx);
    return ok;
}

// --- the two samplers -------------------------------------------------------------------

static void state_release(graph_state * st) {
    if (--st->refs == 0) {
        free(st);
    }
}

static const char * head_name(const struct llama_sampler * smpl) {
    (void) smpl;
    return "fse-graph-head";
}

static const char * tail_name(const struct llama_sampler * smpl) {
    (void) smpl;
    return "fse-graph-stats";
}

// Host sampling (llama_sampler_apply) is never asked of this chain: the engine reads the
// backend's results or, where the chain could not be attached, uses its own samplers.
static void no_apply(struct llama_sampler * smpl, llama_token_data_array * cur_p) {
    (void) smpl;
    (void) cur_p;
}

static void release(struct llama_sampler * smpl) {
    state_release(smpl->ctx);
}

static bool head_backend_init(struct llama_sampler * smpl, ggml_backend_buffer_type_t buft,
                              uint32_t n_outputs_max_per_seq) {
    (void) smpl;
    (void) buft;
    (void) n_outputs_max_per_seq;
    return true; // its ops are checked by the tail's, which come after every other
}

static void head_backend_apply(struct llama_sampler * smpl, struct ggml_context * ctx,
                               struct ggml_cgraph * gf, struct llama_sampler_data * data) {
    (void) gf;
    graph_state * st = smpl->ctx;
    if (st->faults) {
        if (st->fault_in == NULL) { // one input per graph, shared by its rows
            st->fault_in = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 3);
            ggml_set_name(st->fault_in, "fse_fault");
            ggml_set_input(st->fault_in);
        }
        struct ggml_tensor * z = ggml_reshape_1d(ctx, data->logits, ggml_nelements(data->logits));
        data->logits           = build_faults(ctx, z, st->fault_in);
    }
    st->logits = data->logits;
}

static void head_backend_set_input(struct llama_sampler * smpl) {
    graph_state * st = smpl->ctx;
    if (st->fault_in != NULL) {
        ggml_backend_tensor_set(st->fault_in, st->fault, 0, sizeof(st->fault));
    }
}

static void head_backend_reset(struct llama_sampler * smpl) {
    graph_state * st = smpl->ctx;
    st->fault_in     = NULL;
    st->logits       = NULL;
}

static bool tail_backend_init(struct llama_sampler * smpl, ggml_backend_buffer_type_t buft,
                              uint32_t n_outputs_max_per_seq) {
    (void) n_outputs_max_per_seq;
    graph_state * st = smpl->ctx;
    st->supported    = device_runs_ops(buft, st->faults);
    return st->supported;
}

static void tail_backend_apply(struct llama_sampler * smpl, struct ggml_context * ctx,
                               struct ggml_cgraph * gf, struct llama_sampler_data * data) {
    (void) gf;
    graph_state *        st      = smpl->ctx;
    struct ggml_tensor * sampled = data->sampled;
    data->logits     = build_stats(ctx, st->logits != NULL ? st->logits : data->logits, &sampled);
    data->sampled    = sampled;
    data->probs      = NULL; // dist's probabilities over the whole row: 1 MiB, not wanted
    data->candidates = NULL; // dist has already mapped its pick through them
}

static struct llama_sampler_i head_iface = {
    .name              = head_name,
    .apply             = no_apply,
    .free              = release,
    .backend_init      = head_backend_init,
    .backend_apply     = head_backend_apply,
    .backend_set_input = head_backend_set_input,
    .backend_reset     = head_backend_reset,
};

static struct llama_sampler_i tail_iface = {
    .name          = tail_name,
    .apply         = no_apply,
    .free          = release,
    .backend_init  = tail_backend_init,
    .backend_apply = tail_backend_apply,
};

// --- the entry points -------------------------------------------------------------------

int32_t fse_graph_stats_available(void) {
    return 1;
}

void fse_graph_stats_context_params(struct llama_context_params * params) {
    params->n_outputs_max_per_seq = 1;
}

fse_graph_sampler * fse_graph_sampler_new(int32_t top_k, float top_p, float min_p, float temp,
                                          uint32_t seed, int32_t faults) {
    fse_graph_sampler * gs = calloc(1, sizeof(*gs));
    graph_state *       st = calloc(1, sizeof(*st));
    if (gs == NULL || st == NULL) {
        free(gs);
        free(st);
        return NULL;
    }
    st->refs     = 2;
    st->faults   = faults != 0;
    st->fault[0] = 1.0f; // no fault until fse_graph_sampler_set_fault says otherwise
    gs->st       = st;

    struct llama_sampler_chain_params cp = llama_sampler_chain_default_params();
    cp.no_perf = true;
    gs->chain  = llama_sampler_chain_init(cp);
    llama_sampler_chain_add(gs->chain, llama_sampler_init(&head_iface, st));
    if (temp > 0) { // the host chain's order (fse.core.engine._sampler_chain)
        if (top_k > 0) {
            llama_sampler_chain_add(gs->chain, llama_sampler_init_top_k(top_k));
        }
        if (top_p < 1) {
            llama_sampler_chain_add(gs->chain, llama_sampler_init_top_p(top_p, 1));
        }
        if (min_p > 0) {
            llama_sampler_chain_add(gs->chain, llama_sampler_init_min_p(min_p, 1));
        }
        llama_sampler_chain_add(gs->chain, llama_sampler_init_temp(temp));
        llama_sampler_chain_add(gs->chain, llama_sampler_init_dist(seed));
    }
    llama_sampler_chain_add(gs->chain, llama_sampler_init(&tail_iface, st));
    return gs;
}

void fse_graph_sampler_free(fse_graph_sampler * gs) {
    if (gs != NULL) {
        llama_sampler_free(gs->chain);
        free(gs);
    }
}

int32_t fse_graph_sampler_attach(fse_graph_sampler * gs, struct llama_context * ctx, int32_t seq) {
    if (gs->used) {
        return 0; // a chain goes through backend_init once (llama.cpp asserts it)
    }
    if (!llama_set_sampler(ctx, seq, gs->chain)) {
        return 0; // no backend_init ran: the chain may be tried again elsewhere
    }
    gs->used = 1;
    // The chain runs on the device only up to its first sampler that declines, and the
    // tail's backend_init runs only if none before it declined: it must have run, and
    // said yes, for the statistics (and nothing larger) to come back.
    if (!gs->st->supported) {
        llama_set_sampler(ctx, seq, NULL);
        return 0;
    }
    return 1;
}

void fse_graph_sampler_detach(struct llama_context * ctx, int32_t seq) {
    llama_set_sampler(ctx, seq, NULL);
}

void fse_graph_sampler_set_fault(fse_graph_sampler * gs, float scale, float add_mid,
                                 float add_last) {
    gs->st->fault[0] = scale;
    gs->st->fault[1] = add_mid;
    gs->st->fault[2] = add_last;
}

// The fused kernel's fields, in double, from the FSE_GRAPH_STATS_N floats of build_stats.
static void finish(const float * v, int32_t n_vocab, fse_graph_step * out) {
    const double n      = (double) n_vocab;
    const double max    = v[0];
    const double log_s  = log((double) v[2]);
    const double mean   = v[4];
    const double var    = v[5];
    const double finite = v[7];

    fse_logit_stats * s = &out->stats;
    s->max_logit        = v[0];
    s->argmax           = v[1] >= 0 && v[1] < n ? (int32_t) v[1] : -1;
    s->logsumexp        = max + log_s;
    s->entropy          = log_s - (double) v[3] / (double) v[2];
    s->mean             = mean;
    s->variance         = var;
    s->l2_norm          = sqrt(n * (var + mean * mean));
    // The count from step(); the probe decides whether there is one at all.
    s->n_nonfinite = finite >= 0 && finite <= n ? (int32_t) (n - finite) : n_vocab;
    if (s->n_nonfinite == 0 && !isfinite(v[6])) {
        s->n_nonfinite = 1;
    }
    out->token_logit = v[8];
}

int32_t fse_graph_stats_read(struct llama_context * ctx, int32_t i, int32_t n_vocab,
                             fse_graph_step * out) {
    const float * v = llama_get_sampled_logits_ith(ctx, i);
    if (v == NULL || llama_get_sampled_logits_count_ith(ctx, i) != FSE_GRAPH_STATS_N) {
        return -1;
    }
    finish(v, n_vocab, out);
    out->token = llama_get_sampled_token_ith(ctx, i);
    return 0;
}

int32_t fse_graph_stats_eval(const float * logits, int32_t n, fse_graph_step * out) {
    if (n < 1) {
        return -1;
    }
    ggml_backend_t        backend = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, NULL);
    struct ggml_context * ctx     = graph_meta_init();
    int32_t               status  = -1;
    if (backend != NULL && ctx != NULL) {
        struct ggml_cgraph * gf      = ggml_new_graph_custom(ctx, GRAPH_NODES, false);
        struct ggml_tensor * z       = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n);
        struct ggml_tensor * sampled = NULL;
        struct ggml_tensor * stats   = build_stats(ctx, z, &sampled);
        ggml_build_forward_expand(gf, stats);
        ggml_build_forward_expand(gf, sampled);
        // Every tensor its own memory (a few n-float intermediates): simple, and only tests
        // and benchmarks call this.
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
        if (buf != NULL) {
            ggml_backend_tensor_set(z, logits, 0, (size_t) n * sizeof(float));
            if (ggml_backend_graph_compute(backend, gf) == GGML_STATUS_SUCCESS) {
                float v[FSE_GRAPH_STATS_N];
                ggml_backend_tensor_get(stats, v, 0, sizeof(v));
                ggml_backend_tensor_get(sampled, &out->token, 0, sizeof(out->token));
                finish(v, n, out);
                status = 0;
            }
            ggml_backend_buffer_free(buf);
        }
    }
    if (ctx != NULL) {
        ggml_free(ctx);
    }
    if (backend != NULL) {
        ggml_backend_free(backend);
    }
    return status;
}

#else // llama.h without the backend sampling API: the engine keeps the host kernel

int32_t fse_graph_stats_available(void) {
    return 0;
}

void fse_graph_stats_context_params(struct llama_context_params * params) {
    (void) params;
}

fse_graph_sampler * fse_graph_sampler_new(int32_t top_k, float top_p, float min_p, float temp,
                                          uint32_t seed, int32_t faults) {
    (void) top_k, (void) top_p, (void) min_p, (void) temp, (void) seed, (void) faults;
    return NULL;
}

void fse_graph_sampler_free(fse_graph_sampler * gs) {
    (void) gs;
}

int32_t fse_graph_sampler_attach(fse_graph_sampler * gs, struct llama_context * ctx, int32_t seq) {
    (void) gs, (void) ctx, (void) seq;
    return 0;
}

void fse_graph_sampler_detach(struct llama_context * ctx, int32_t seq) {
    (void) ctx, (void) seq;
}

void fse_graph_sampler_set_fault(fse_graph_sampler * gs, float scale, float add_mid,
                                 float add_last) {
    (void) gs, (void) scale, (void) add_mid, (void) add_last;
}

int32_t fse_graph_stats_read(struct llama_context * ctx, int32_t i, int32_t n_vocab,
                             fse_graph_step * out) {
    (void) ctx, (void) i, (void) n_vocab, (void) out;
    return -1;
}

int32_t fse_graph_stats_eval(const float * logits, int32_t n, fse_graph_step * out) {
    (void) logits, (void) n, (void) out;
    return -1;
}

#endif
