"""cffi build script for ``fse._native``: libfse's C core plus the libllama binding.

API mode: the cdef below declares only what the project calls, and every struct
ends in ``...;`` so cffi takes the real layout from llama.h at build time. A field
that a future llama.h renames or drops fails this build, not a run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cffi import FFI

NATIVE = Path(__file__).resolve().parent
ROOT = NATIVE.parent
# Written by `native/libllama.py --prepare` (the Makefile step before this build): where
# llama.h is, with libllama and its ggml libraries already copied to daemon/fse/_libs,
# which the extension finds through its RUNPATH ($ORIGIN/_libs).
LOCATION = ROOT / "build" / "libllama.json"
PACKAGE_LIBS = ROOT / "daemon" / "fse" / "_libs"

CDEF = r"""
typedef int32_t llama_token;
typedef int32_t llama_pos;
typedef int32_t llama_seq_id;
typedef struct llama_memory_i * llama_memory_t;

struct llama_model;
struct llama_context;
struct llama_vocab;
struct llama_sampler;

enum llama_split_mode {
    LLAMA_SPLIT_MODE_NONE,
    LLAMA_SPLIT_MODE_LAYER,
    LLAMA_SPLIT_MODE_ROW,
    ...
};

struct llama_model_params {
    int32_t n_gpu_layers;
    enum llama_split_mode split_mode;
    int32_t main_gpu;
    const float * tensor_split;
    bool    vocab_only;
    ...;
};

typedef struct ggml_backend_device * ggml_backend_dev_t;
enum ggml_backend_dev_type {
    GGML_BACKEND_DEVICE_TYPE_CPU,
    GGML_BACKEND_DEVICE_TYPE_GPU,
    GGML_BACKEND_DEVICE_TYPE_IGPU,
    GGML_BACKEND_DEVICE_TYPE_ACCEL,
    ...
};
size_t ggml_backend_dev_count(void);
size_t llama_max_devices(void);
ggml_backend_dev_t ggml_backend_dev_get(size_t index);
const char * ggml_backend_dev_name(ggml_backend_dev_t device);
const char * ggml_backend_dev_description(ggml_backend_dev_t device);
void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total);
enum ggml_backend_dev_type ggml_backend_dev_type(ggml_backend_dev_t device);

/* ggml's RPC backend (fse.core.rpc): found by name in the registry, its entry points
   (ggml_backend_rpc_add_server, ggml_backend_rpc_start_server) by proc address. */
typedef struct ggml_backend_reg * ggml_backend_reg_t;
ggml_backend_reg_t ggml_backend_reg_by_name(const char * name);
void * ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char * name);
void ggml_backend_register(ggml_backend_reg_t reg);
/* GGML_ABORT (a lost RPC worker) calls this before abort(): fse.core.rpc's handler. */
typedef void (*ggml_abort_callback_t)(const char * error_message);
ggml_abort_callback_t ggml_set_abort_callback(ggml_abort_callback_t callback);
extern "Python" void fse_ggml_abort(const char * error_message);

struct llama_context_params {
    uint32_t n_ctx;
    uint32_t n_batch;
    uint32_t n_ubatch;
    uint32_t n_seq_max;
    int32_t  n_threads;
    int32_t  n_threads_batch;
    bool     no_perf;
    bool     kv_unified;
    ...;
};

typedef struct llama_batch {
    int32_t n_tokens;
    llama_token  *  token;
    float        *  embd;
    llama_pos    *  pos;
    int32_t      *  n_seq_id;
    llama_seq_id ** seq_id;
    int8_t       *  logits;
    ...;
} llama_batch;

typedef struct llama_sampler_chain_params {
    bool no_perf;
    ...;
} llama_sampler_chain_params;

typedef struct llama_chat_message {
    const char * role;
    const char * content;
    ...;
} llama_chat_message;

void llama_backend_init(void);
const char * llama_print_system_info(void);

struct llama_model_params   llama_model_default_params(void);
struct llama_context_params llama_context_default_params(void);
struct llama_sampler_chain_params llama_sampler_chain_default_params(void);

struct llama_model * llama_model_load_from_file(const char * path_model, struct llama_model_params params);
void llama_model_free(struct llama_model * model);
const struct llama_vocab * llama_model_get_vocab(const struct llama_model * model);
int32_t llama_model_n_ctx_train(const struct llama_model * model);
int32_t llama_model_n_layer(const struct llama_model * model);
bool llama_supports_gpu_offload(void);
int32_t llama_model_desc(const struct llama_model * model, char * buf, size_t buf_size);
uint64_t llama_model_size(const struct llama_model * model);
int32_t llama_model_meta_val_str(const struct llama_model * model, const char * key, char * buf, size_t buf_size);
const char * llama_model_chat_template(const struct llama_model * model, const char * name);

struct llama_context * llama_init_from_model(struct llama_model * model, struct llama_context_params params);
void llama_free(struct llama_context * ctx);
uint32_t llama_n_ctx(const struct llama_context * ctx);
uint32_t llama_n_batch(const struct llama_context * ctx);
llama_memory_t llama_get_memory(const struct llama_context * ctx);
bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1);

int32_t llama_vocab_n_tokens(const struct llama_vocab * vocab);
bool llama_vocab_is_eog(const struct llama_vocab * vocab, llama_token token);
int32_t llama_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
                       llama_token * tokens, int32_t n_tokens_max, bool add_special, bool parse_special);
int32_t llama_token_to_piece(const struct llama_vocab * vocab, llama_token token, char * buf,
                             int32_t length, int32_t lstrip, bool special);
int32_t llama_chat_apply_template(const char * tmpl, const struct llama_chat_message * chat, size_t n_msg,
                                  bool add_ass, char * buf, int32_t length);

struct llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max);
void llama_batch_free(struct llama_batch batch);
int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch);
float * llama_get_logits_ith(struct llama_context * ctx, int32_t i);

struct llama_sampler * llama_sampler_chain_init(struct llama_sampler_chain_params params);
void llama_sampler_chain_add(struct llama_sampler * chain, struct llama_sampler * smpl);
struct llama_sampler * llama_sampler_init_greedy(void);
struct llama_sampler * llama_sampler_init_dist(uint32_t seed);
struct llama_sampler * llama_sampler_init_top_k(int32_t k);
struct llama_sampler * llama_sampler_init_top_p(float p, size_t min_keep);
struct llama_sampler * llama_sampler_init_min_p(float p, size_t min_keep);
struct llama_sampler * llama_sampler_init_temp(float t);
llama_token llama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx);
void llama_sampler_free(struct llama_sampler * smpl);
"""

FSE_H = (NATIVE / "fse.h").read_text()
# fse.h is plain C; cffi's cdef does not take preprocessor lines or comments-with-#.
CDEF += "\n".join(line for line in FSE_H.splitlines() if not line.startswith("#"))

SOURCES = [
    "fse_stats.c",
    "fse_sample.c",
    "fse_step.c",
    "fse_loop.c",
    "fse_near_loop.c",
    "fse_log.c",
    "fse_vocab.c",
    "fse_graph_stats.c",
    "fse_decode.c",
]
# Included by the sources: listed so that editing one alone rebuilds the extension.
HEADERS = ["fse.h", "fse_stats_width.h"]


def _ggml_uses_openmp() -> bool:
    """Whether ggml's CPU library runs on OpenMP (it then needs libgomp): fse_step.c then
    shares its OpenMP team instead of starting threads of its own."""
    return any(b"libgomp.so" in lib.read_bytes() for lib in PACKAGE_LIBS.glob("libggml-cpu*.so"))


def _include_dirs() -> list[str]:
    try:
        found = json.loads(LOCATION.read_text())
    except (OSError, ValueError):
        raise SystemExit(
            f"{LOCATION} is missing or unreadable: run `python native/libllama.py --prepare` "
            "first (`make setup` does)"
        ) from None
    return [str(d) for d in found["include_dirs"]]


OPENMP = ["-fopenmp", "-DFSE_OPENMP"] if _ggml_uses_openmp() else []


def _has_backend_sampling(include_dirs: list[str]) -> bool:
    """Whether llama.h has the backend sampling API that fse_graph_stats.c builds on
    (an older llama.cpp from LLAMA_CPP_DIR lacks it: the file then builds its stubs)."""
    for d in include_dirs:
        try:
            text = (Path(d) / "llama.h").read_text()
        except OSError:
            continue
        names = ("backend_apply", "llama_set_sampler", "llama_get_sampled_logits_count_ith")
        ggml = any((Path(g) / "ggml-backend.h").exists() for g in include_dirs)
        return all(name in text for name in names) and ggml
    return False


GRAPH_STATS = ["-DFSE_GRAPH_STATS=1"] if _has_backend_sampling(_include_dirs()) else []

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "fse._native",
    '#include "llama.h"\n#include "fse.h"\n',
    # setuptools insists on paths relative to setup.py.
    sources=[os.path.relpath(NATIVE / s) for s in SOURCES],
    depends=[os.path.relpath(NATIVE / h) for h in HEADERS],
    include_dirs=[str(NATIVE), *_include_dirs()],
    library_dirs=[str(PACKAGE_LIBS)],
    libraries=["llama"],
    # No -ffast-math: it would let the compiler assume away the NaN/Inf checks.
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-pthread", *OPENMP, *GRAPH_STATS],
    extra_link_args=["-Wl,-rpath,$ORIGIN/_libs", "-pthread", *OPENMP[:1]],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.environ.get("FSE_BUILD_DIR", str(ROOT / "build")), verbose=True)
