// fse.h: the C core of libfse. Plain structs, no allocation on the per-token path.
#pragma once

#include <stdint.h>

// Statistics of one step's logits, computed in one fused pass over the vocabulary.
// NaN and +-Inf logits are counted and left out of every other field, so the
// finite statistics stay meaningful while the non_finite guard halts the stream.
typedef struct fse_logit_stats {
    float   max_logit;   // largest finite logit
    int32_t argmax;      // index of the first largest finite logit; -1 if none is finite
    double  logsumexp;   // log(sum(exp(logit))) over finite logits
    double  entropy;     // of softmax(logits) over the finite logits, in nats
    double  mean;        // mean of the finite logits
    double  variance;    // population variance of the finite logits
    double  l2_norm;     // sqrt(sum(logit^2)) over the finite logits
    int32_t n_nonfinite; // how many logits are NaN or +-Inf (found from the exponent bits)
} fse_logit_stats;

// Read n logits in place and fill *out. Never reads past logits[n-1].
void fse_logit_stats_compute(const float * logits, int32_t n, fse_logit_stats * out);

// Sampling as llama.cpp's chain top_k -> top_p -> min_p -> temp -> dist (min_keep 1),
// with the same seeded generator (std::mt19937) and arithmetic, over the k largest
// logits only: no vocabulary-sized candidate array. One per stream.
enum { FSE_TOP_K_MAX = 256 };
typedef struct fse_sampler fse_sampler;

// NULL unless 1 <= top_k <= FSE_TOP_K_MAX and temp > 0 (use llama.cpp's chain then), or OOM.
fse_sampler * fse_sampler_new(int32_t top_k, float top_p, float min_p, float temp, uint32_t seed);
void          fse_sampler_free(fse_sampler * sampler);
// The token drawn from n finite logits; -1 if none is finite.
int32_t       fse_sampler_sample(fse_sampler * sampler, const float * logits, int32_t n);

// One stream's share of a decode step: its logits in, its statistics and token out.
typedef struct fse_step_job {
    const float *   logits;  // in: the stream's n_vocab logits (read in place)
    fse_sampler *   sampler; // in: NULL = the argmax (greedy, or a sampler run afterwards)
    fse_logit_stats stats;   // out
    int32_t         token;   // out: sampled; the argmax (>= 0) when a logit is not finite
} fse_step_job;

// Threads that share a step's jobs: the caller plus n_threads - 1 workers, started once.
typedef struct fse_pool fse_pool;

fse_pool * fse_pool_new(int32_t n_threads); // NULL on bad args or OOM
void       fse_pool_free(fse_pool * pool);
int32_t    fse_pool_threads(const fse_pool * pool);
// Measure (and sample) every job's logits, spread over the pool; returns when all are done.
void       fse_step(fse_pool * pool, fse_step_job * jobs, int32_t n_jobs, int32_t n_vocab);

// Detects a cycle in the tail of a token stream: the last `span` tokens repeat
// with period p (1 <= p <= max_period), at least min_repeats times and over at
// least min_span tokens. Each push costs O(max_period) integer compares, no allocation.
typedef struct fse_loop fse_loop;

fse_loop * fse_loop_new(int32_t max_period, int32_t min_repeats, int32_t min_span); // NULL on bad args or OOM
void       fse_loop_free(fse_loop * loop);
// Append a token; returns the smallest period that now forms a loop (0 if none) and its span.
int32_t    fse_loop_push(fse_loop * loop, int32_t token, int32_t * span);

// Detects an approximate cycle in the tail of a token stream: for some period p
// (1 <= p <= max_period), over the last span = max(min_copies * p, min_span) tokens, at
// least min_match of the span - p positions hold the token p before them (a loop with
// a counter or a timestamp in each copy). O(max_period) integer work per push, no allocation.
typedef struct fse_near_loop fse_near_loop;

// NULL on bad args (max_period 1..4096, min_copies 2..1000, min_span 2..65536,
// 0 < min_match <= 1) or OOM.
fse_near_loop * fse_near_loop_new(int32_t max_period, int32_t min_copies, int32_t min_span,
                                  double min_match);
void            fse_near_loop_free(fse_near_loop * nl);
// Append a token; returns the smallest period that now forms a near loop (0 if none) and
// its match fraction (0 if none).
int32_t         fse_near_loop_push(fse_near_loop * nl, int32_t token, double * match);
// The period with the highest match fraction among those whose window is full, and that
// fraction, after the last push (0 and 0 if no full window holds a match): what
// calibration measures.
int32_t         fse_near_loop_best(const fse_near_loop * nl, double * match);

// Route llama.cpp's log through libfse: kept quiet unless verbose, and the last
// error line is kept so a failed load can be reported in one clear sentence.
void         fse_log_install(int verbose);
const char * fse_log_last_error(void);

// llama_decode, first waking whoever waits for the previous step's tokens: one 8-byte
// write of 1 to wake_fd (an eventfd; none if wake_fd < 0), made inside this call so with
// the GIL already released: the event loop hands those tokens to gRPC while the batch
// decodes, instead of taking the GIL from the decode thread before it reaches the decode.
struct llama_context;
struct llama_batch;
int32_t fse_decode(struct llama_context * ctx, struct llama_batch batch, int32_t wake_fd);

// The most bytes of text one token of this vocabulary can stand for, so that a prompt of
// B bytes needs at least B / that many tokens; 0 where no such bound holds (a tokenizer
// that normalizes text, or tokens that swallow whitespace). Walks the vocabulary once.
struct llama_vocab;
int32_t fse_vocab_max_token_bytes(const struct llama_vocab * vocab);

// A step's statistics computed inside llama.cpp's compute graph, on the device that holds
// the output layer (fse_graph_stats.c; llama.cpp's EXPERIMENTAL backend sampling API): a
// sampler chain per stream adds the ops and, when sampling is not greedy, llama.cpp's
// backend top_k -> top_p -> min_p -> temp -> dist; only FSE_GRAPH_STATS_N floats and the
// token come back, not the n_vocab logits. Every entry point says "unavailable" where
// libfse was built against a llama.h without that API.
enum { FSE_GRAPH_STATS_N = 9 };
typedef struct fse_graph_sampler fse_graph_sampler;
struct llama_context;
struct llama_context_params;

typedef struct fse_graph_step {
    fse_logit_stats stats;       // as fse_logit_stats_compute, but with a NaN or Inf present
                                 // (n_nonfinite > 0) the other fields are NaN or garbage
    int32_t         token;       // sampled in the graph (the argmax when greedy); -1 if none
    float           token_logit; // its logit: its nll is stats.logsumexp - token_logit
} fse_graph_step;

int32_t fse_graph_stats_available(void); // 1 if built with the API
// Set what a context for this path needs (one output per sequence and step).
void    fse_graph_stats_context_params(struct llama_context_params * params);
// temp <= 0: greedy. faults: build the debug fault ops (fse_graph_sampler_set_fault).
// NULL if unavailable or OOM.
fse_graph_sampler * fse_graph_sampler_new(int32_t top_k, float top_p, float min_p, float temp,
                                          uint32_t seed, int32_t faults);
void    fse_graph_sampler_free(fse_graph_sampler * gs); // detach it first
// Attach to sequence seq of ctx (once per sampler): 1 if the whole chain runs in the
// graph, else 0 and nothing is attached (use the host kernel then).
int32_t fse_graph_sampler_attach(fse_graph_sampler * gs, struct llama_context * ctx, int32_t seq);
void    fse_graph_sampler_detach(struct llama_context * ctx, int32_t seq);
// The faults applied to the logits of the next decode: z * scale, + add_mid at n_vocab / 2,
// + add_last at n_vocab - 1 (1, 0, 0: none). Only for a sampler made with faults.
void    fse_graph_sampler_set_fault(fse_graph_sampler * gs, float scale, float add_mid,
                                    float add_last);
// After a decode, the results for batch entry i: 0, or -1 if none came back.
int32_t fse_graph_stats_read(struct llama_context * ctx, int32_t i, int32_t n_vocab,
                             fse_graph_step * out);
// The same ops and arithmetic over n given logits on ggml's CPU backend, greedy (the tests'
// and benchmarks' way to feed it any vector): 0, or -1 on failure or if unavailable.
int32_t fse_graph_stats_eval(const float * logits, int32_t n, fse_graph_step * out);
