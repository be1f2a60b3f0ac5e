/* The worker threads that split a job (a product's outputs, a WKV step's heads) across cores. POSIX
 * threads; without them (not Linux) every job runs on the calling thread. */
#include "kernels.h"

#if defined(__linux__)
#define AVIARY_POOL 1
#endif

/* A spin-wait hint: `pause` on x86, `yield` on ARM. */
#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

/* ---- threads -------------------------------------------------------------------------------------
 * The products of a decode step come in quick succession, with one-thread small ops in between. A torch
 * (OpenMP) parallel region under OMP_WAIT_POLICY=PASSIVE wakes a sleeping worker each time, a cost that
 * adds up over a step (docs/benchmarks.md, Inference item 6; the gaps: Design measurements item 4).
 * These workers instead wait for the next job by spinning for SPIN_NS after each one (first with
 * `pause`, then yielding the core to anything else runnable), and only then sleep on a condition
 * variable: a decode step keeps its helpers awake, and the machine gets its cores back within SPIN_NS of
 * the last job.
 *
 * A job is cut into a few chunks per thread, and every thread, the caller included, claims chunks one
 * at a time with a compare-and-swap on (job number, next chunk). The caller waits only for chunks that a
 * worker has claimed and is running. A worker that is not on a core (torch's OpenMP workers may be
 * spinning on it, under OpenMP's default wait policy) claims nothing: the caller does its chunks and the
 * job runs at one-thread speed instead of stalling. One caller at a time uses the pool (a second one,
 * from another Python thread, runs its job alone); workers are started on first use, up to the count
 * asked for, and a forked child starts with none. */
#ifdef AVIARY_POOL
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#define MAX_THREADS 256
#define SPIN_NS 300000   /* 0.3 ms: longer than most gaps between the products of a decode step */
#define PAUSE_NS 20000   /* of which the first 20 us spin on `pause` without yielding */
#define CHUNKS_PER_THREAD 4

/* A parallel job: run(ctx, lo, hi) over [0, n) in chunks of `chunk` items. */
typedef struct {
    void (*run)(const void *ctx, int64_t lo, int64_t hi);
    const void *ctx;
    int64_t n, chunk, nchunks;
} task_t;

static task_t pool_task;                 /* written by the pool's holder before it publishes a job; read
                                          * only by a thread that has claimed one of its chunks */
static _Atomic int64_t pool_nchunks;     /* pool_task.nchunks, which threads with a stale job number read */
static _Atomic uint64_t pool_claim;      /* (job number << 32) | next unclaimed chunk */
static atomic_int pool_done;             /* chunks of the current job finished */
static atomic_int pool_sleepers;         /* workers asleep on pool_cv */
static pthread_mutex_t pool_sleep_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER; /* held by the caller that uses the pool */
static int pool_size;                                        /* workers started */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claim and run chunks of job `job` until none is left. A claim made with a stale job number fails. */
static void run_chunks(uint32_t job) {
    uint64_t v = atomic_load(&pool_claim);
    while ((uint32_t)(v >> 32) == job &&
           (int64_t)(v & 0xffffffffu) < atomic_load_explicit(&pool_nchunks, memory_order_relaxed)) {
        if (atomic_compare_exchange_weak(&pool_claim, &v, v + 1)) { /* chunk (v & mask) is ours */
            int64_t lo = (int64_t)(v & 0xffffffffu) * pool_task.chunk;
            int64_t hi = lo + pool_task.chunk < pool_task.n ? lo + pool_task.chunk : pool_task.n;
            pool_task.run(pool_task.ctx, lo, hi);
            atomic_fetch_add(&pool_done, 1);
            v = atomic_load(&pool_claim);
        }
    }
}

static void *worker_main(void *arg) {
    (void)arg;
    uint32_t seen = (uint32_t)(atomic_load(&pool_claim) >> 32);
    for (;;) {
        uint32_t job = (uint32_t)(atomic_load(&pool_claim) >> 32);
        if (job == seen) {
            int64_t start = now_ns(), spun = 0;
            while ((job = (uint32_t)(atomic_load(&pool_claim) >> 32)) == seen && spun < SPIN_NS) {
                if (spun < PAUSE_NS) {
                    for (int i = 0; i < 64; i++) cpu_relax();
                } else {
                    sched_yield();
                }
                spun = now_ns() - start;
            }
            if (job == seen) { /* asleep until the next job: see pool_run for the handshake */
                pthread_mutex_lock(&pool_sleep_mu);
                atomic_fetch_add(&pool_sleepers, 1);
                while ((job = (uint32_t)(atomic_load(&pool_claim) >> 32)) == seen) {
                    pthread_cond_wait(&pool_cv, &pool_sleep_mu);
                }
                atomic_fetch_sub(&pool_sleepers, 1);
                pthread_mutex_unlock(&pool_sleep_mu);
            }
        }
        seen = job;
        run_chunks(job);
    }
    return NULL;
}

static void pool_forget(void) { /* in a forked child: the workers did not come along */
    pool_size = 0;
    atomic_store(&pool_sleepers, 0);
    pthread_mutex_init(&pool_mu, NULL);
    pthread_mutex_init(&pool_sleep_mu, NULL);
    pthread_cond_init(&pool_cv, NULL);
}

/* Start workers up to n - 1 (the caller is the n-th thread). Caller holds pool_mu. */
static void pool_grow(int n) {
    static int registered = 0;
    if (!registered) {
        pthread_atfork(NULL, NULL, pool_forget);
        registered = 1;
    }
    if (n > MAX_THREADS) n = MAX_THREADS;
    while (pool_size < n - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int err = pthread_create(&th, &attr, worker_main, NULL);
        pthread_attr_destroy(&attr);
        if (err != 0) {
            break; /* fewer workers: the caller claims what they do not */
        }
        pool_size++;
    }
}

/* Run job(ctx, 0, n) on up to n_threads threads, in chunks that are multiples of `align`. */
static void pool_run(void (*job)(const void *, int64_t, int64_t), const void *ctx, int64_t n, int64_t align,
                     int n_threads) {
    if (n_threads <= 1 || pthread_mutex_trylock(&pool_mu) != 0) { /* busy: another thread has the pool */
        job(ctx, 0, n);
        return;
    }
    pool_grow(n_threads);
    int64_t pieces = (int64_t)n_threads * CHUNKS_PER_THREAD;
    int64_t chunk = ((n + pieces - 1) / pieces + align - 1) / align * align;
    pool_task = (task_t){job, ctx, n, chunk, (n + chunk - 1) / chunk};
    atomic_store_explicit(&pool_nchunks, pool_task.nchunks, memory_order_relaxed); /* ordered by the publish */
    atomic_store(&pool_done, 0);
    uint32_t id = (uint32_t)(atomic_load(&pool_claim) >> 32) + 1;
    atomic_store(&pool_claim, (uint64_t)id << 32); /* publishes the job (seq_cst) */
    if (atomic_load(&pool_sleepers) > 0) { /* a sleeper counted itself before its last look at the job */
        pthread_mutex_lock(&pool_sleep_mu);
        pthread_cond_broadcast(&pool_cv);
        pthread_mutex_unlock(&pool_sleep_mu);
    }
    run_chunks(id);
    for (int spins = 0; atomic_load(&pool_done) < pool_task.nchunks; spins++) { /* chunks workers run */
        if (spins < 4096) {
            cpu_relax();
        } else {
            sched_yield();
        }
    }
    pthread_mutex_unlock(&pool_mu);
}
#endif

/* Run job(ctx, 0, n) on `threads` threads in chunks of multiples of `align` (one thread without the pool). */
void aviary_parallel(job_fn job, const void *ctx, int64_t n, int64_t align, int threads) {
#ifdef AVIARY_POOL
    pool_run(job, ctx, n, align, threads);
#else
    (void)align;
    (void)threads;
    job(ctx, 0, n);
#endif
}
