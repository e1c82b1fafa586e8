// fse_step.c: one call per decode step measures and samples every stream's logits,
// the streams shared over a small pool of threads.
//
// After llama_decode the scheduler has one logit vector per stream. Measuring and
// sampling them one after another on its own thread makes the host work grow with
// the streams while llama.cpp's threads sit idle: with 16 streams on a GPU that work
// took longer than the decode itself. Here the caller and the pool's threads take the
// next unclaimed job from a shared counter until none is left, so N vectors cost about
// N / threads kernels. One vector runs on the calling thread alone (no wake-up).
//
// Whose threads: where ggml runs its CPU work on OpenMP (the default build on Linux),
// the step is an OpenMP loop over the jobs on the same team as llama_decode's, from the
// same thread: libgomp's workers are still spinning at the end of the decode's last
// parallel region and pick the jobs up at once. Threads of our own were measured there
// to gain nothing: right after a decode the spinning OpenMP workers hold the other
// cores (2 cores, 8 streams: 2,468 us with one thread, 2,459 with two; 2,595 against
// 1,492 when the decode's workers had gone to sleep first). build_native.py defines
// FSE_OPENMP when ggml's CPU library needs libgomp.
// Otherwise the pool's own threads sleep on a condition variable between steps: a step
// is ~1-20 ms, so a wake-up of a few microseconds costs nothing and no core spins while
// llama.cpp decodes. Nothing is allocated per step either way.

#include "fse.h"

#include <stdlib.h>

#ifdef FSE_OPENMP
#include <omp.h>
#else
#include <pthread.h>
#include <stdatomic.h>
#endif

#ifdef FSE_OPENMP

struct fse_pool {
    int32_t n_threads; // the OpenMP team, as ggml's
};

#else

struct fse_pool {
    pthread_mutex_t mu;
    pthread_cond_t  go;   // a new step (or stop) for the workers
    pthread_cond_t  done; // the last busy worker finished
    pthread_t *     threads;
    int32_t         n_threads; // workers, besides the caller
    uint64_t        step;      // bumped once per fse_step that wakes the workers
    int32_t         busy;      // workers still on the current step
    int             stop;
    // The current step, written before `step` is bumped under mu.
    fse_step_job * jobs;
    int32_t        n_jobs;
    int32_t        n_vocab;
    atomic_int     next; // the next unclaimed job
};

#endif

static void run_job(fse_step_job * job, int32_t n_vocab) {
    fse_logit_stats_compute(job->logits, n_vocab, &job->stats);
    if (job->stats.n_nonfinite) {
        // Never sample over NaN/Inf: the non_finite guard halts this step anyway.
        job->token = job->stats.argmax < 0 ? 0 : job->stats.argmax;
    } else if (job->sampler != NULL) {
        job->token = fse_sampler_sample(job->sampler, job->logits, n_vocab);
    } else {
        // Greedy (or llama.cpp's sampler, run by the caller afterwards): the first
        // maximum, exactly what llama.cpp's greedy sampler picks.
        job->token = job->stats.argmax;
    }
}

#ifdef FSE_OPENMP

fse_pool * fse_pool_new(int32_t n_threads) {
    if (n_threads < 1) {
        return NULL;
    }
    fse_pool * pool = malloc(sizeof *pool);
    if (pool != NULL) {
        pool->n_threads = n_threads;
    }
    return pool;
}

void fse_pool_free(fse_pool * pool) {
    free(pool);
}

int32_t fse_pool_threads(const fse_pool * pool) {
    return pool->n_threads;
}

void fse_step(fse_pool * pool, fse_step_job * jobs, int32_t n_jobs, int32_t n_vocab) {
    if (n_jobs <= 1 || pool->n_threads == 1) {
        for (int32_t i = 0; i < n_jobs; i++) {
            run_job(&jobs[i], n_vocab);
        }
        return;
    }
    const int32_t team = pool->n_threads < n_jobs ? pool->n_threads : n_jobs;
#pragma omp parallel for num_threads(team) schedule(dynamic, 1)
    for (int32_t i = 0; i < n_jobs; i++) {
        run_job(&jobs[i], n_vocab);
    }
}

#else

static void run_jobs(fse_pool * pool) {
    for (;;) {
        const int32_t i = atomic_fetch_add(&pool->next, 1);
        if (i >= pool->n_jobs) {
            return;
        }
        run_job(&pool->jobs[i], pool->n_vocab);
    }
}

static void * worker(void * arg) {
    fse_pool * pool = arg;
    uint64_t   seen = 0;
    pthread_mutex_lock(&pool->mu);
    for (;;) {
        while (pool->step == seen && !pool->stop) {
            pthread_cond_wait(&pool->go, &pool->mu);
        }
        if (pool->stop) {
            break;
        }
        seen = pool->step;
        pthread_mutex_unlock(&pool->mu);
        run_jobs(pool);
        pthread_mutex_lock(&pool->mu);
        if (--pool->busy == 0) {
            pthread_cond_signal(&pool->done);
        }
    }
    pthread_mutex_unlock(&pool->mu);
    return NULL;
}

fse_pool * fse_pool_new(int32_t n_threads) {
    if (n_threads < 1) {
        return NULL;
    }
    fse_pool * pool = calloc(1, sizeof *pool);
    if (pool == NULL) {
        return NULL;
    }
    pool->threads = calloc((size_t) n_threads, sizeof *pool->threads);
    if (pool->threads == NULL) {
        free(pool);
        return NULL;
    }
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->go, NULL);
    pthread_cond_init(&pool->done, NULL);
    atomic_init(&pool->next, 0);
    // The caller is one of the threads: n_threads - 1 workers.
    for (int32_t i = 0; i < n_threads - 1; i++) {
        if (pthread_create(&pool->threads[i], NULL, worker, pool) != 0) {
            break; // fewer workers: still correct, only slower
        }
        pool->n_threads++;
    }
    return pool;
}

void fse_pool_free(fse_pool * pool) {
    if (pool == NULL) {
        return;
    }
    pthread_mutex_lock(&pool->mu);
    pool->stop = 1;
    pthread_cond_broadcast(&pool->go);
    pthread_mutex_unlock(&pool->mu);
    for (int32_t i = 0; i < pool->n_threads; i++) {
        pthread_join(pool->threads[i], NULL);
    }
    pthread_cond_destroy(&pool->done);
    pthread_cond_destroy(&pool->go);
    pthread_mutex_destroy(&pool->mu);
    free(pool->threads);
    free(pool);
}

int32_t fse_pool_threads(const fse_pool * pool) {
    return pool->n_threads + 1;
}

void fse_step(fse_pool * pool, fse_step_job * jobs, int32_t n_jobs, int32_t n_vocab) {
    if (n_jobs <= 1 || pool->n_threads == 0) {
        for (int32_t i = 0; i < n_jobs; i++) {
            run_job(&jobs[i], n_vocab);
        }
        return;
    }
    pthread_mutex_lock(&pool->mu);
    pool->jobs    = jobs;
    pool->n_jobs  = n_jobs;
    pool->n_vocab = n_vocab;
    atomic_store(&pool->next, 0);
    pool->busy = pool->n_threads;
    pool->step++;
    pthread_cond_broadcast(&pool->go);
    pthread_mutex_unlock(&pool->mu);
    run_jobs(pool);
    pthread_mutex_lock(&pool->mu);
    while (pool->busy > 0) {
        pthread_cond_wait(&pool->done, &pool->mu);
    }
    pthread_mutex_unlock(&pool->mu);
}

#endif
