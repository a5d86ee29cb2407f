/* A small persistent thread pool for the sparse kernels.
 *
 * Why not OpenMP: PyTorch in the same process ships its own libgomp; two OpenMP runtimes spinning on a 2-core VM
 * stall each other. Here the caller and n-1 workers claim the parts of a job one at a time, so on a shared machine a
 * worker the OS has not scheduled yet costs nothing (the caller runs its parts). Workers spin briefly (sp_set_spin,
 * default 100 us) on a generation counter, then sleep on a futex, so back-to-back kernel calls (the executor makes
 * ~200 per token) cost about a microsecond to dispatch while an idle process burns no CPU.
 */
#define _GNU_SOURCE
#include "sppool.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define MAX_THREADS 256

/* A job is nparts parts claimed one at a time by the caller and the workers (compare-and-swap on one 64-bit word
 * holding the job's generation and the next part), so a worker that the OS has not scheduled yet never holds up
 * the caller: the caller simply runs the remaining parts itself. */
static struct {
    pthread_t th[MAX_THREADS];
    int nworkers;               /* workers started (threads - 1) */
    _Atomic uint32_t gen;       /* futex word: bumped once per job (and on shutdown) */
    _Atomic uint64_t claim;     /* (generation << 32) | next part */
    _Atomic int done;           /* parts finished in the current job */
    _Atomic int sleepers;       /* workers inside futex_wait */
    _Atomic int quit;
    _Atomic(sp_pool_fn) fn;
    _Atomic(void *) arg;
    _Atomic int nparts;
    uint32_t start_gen;
} P;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER; /* one caller at a time; guards start/stop */
static int g_threads = 0;                                   /* 0 = not chosen yet: all usable cores */
static _Atomic int g_spin_us = 100;

static long futex(_Atomic uint32_t *addr, int op, uint32_t val) {
    return syscall(SYS_futex, (uint32_t *)addr, op, val, NULL, NULL, 0);
}

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

/* claim and run parts of the job of generation g until none is left (or the job changed) */
static void run_parts(uint32_t g) {
    for (;;) {
        uint64_t c = atomic_load_explicit(&P.claim, memory_order_acquire);
        if ((uint32_t)(c >> 32) != g) return;
        int part = (int)(uint32_t)c;
        sp_pool_fn fn = atomic_load_explicit(&P.fn, memory_order_relaxed);
        void *arg = atomic_load_explicit(&P.arg, memory_order_relaxed);
        int nparts = atomic_load_explicit(&P.nparts, memory_order_relaxed);
        if (part >= nparts) return;
        /* success means the job was still g with this part unclaimed, so fn/arg/nparts read above were g's */
        if (!atomic_compare_exchange_weak_explicit(&P.claim, &c, c + 1, memory_order_acq_rel, memory_order_relaxed))
            continue;
        fn(arg, part, nparts);
        atomic_fetch_add_explicit(&P.done, 1, memory_order_release);
    }
}

static void *worker_main(void *p) {
    (void)p;
    uint32_t seen = P.start_gen; /* the generation before this worker existed: a job posted meanwhile is ours */
    for (;;) {
        uint32_t g;
        double t0 = 0;
        int spins = 0;
        while ((g = atomic_load_explicit(&P.gen, memory_order_acquire)) == seen) {
            if (++spins == 64) {
                spins = 0;
                double t = now_us();
                if (t0 == 0) {
                    t0 = t;
                } else if (t - t0 > atomic_load_explicit(&g_spin_us, memory_order_relaxed)) {
                    atomic_fetch_add(&P.sleepers, 1);
                    futex(&P.gen, FUTEX_WAIT_PRIVATE, seen);
                    atomic_fetch_sub(&P.sleepers, 1);
                    t0 = 0;
                }
            }
            CPU_RELAX();
        }
        seen = g;
        if (atomic_load_explicit(&P.quit, memory_order_acquire)) return NULL;
        run_parts(g);
    }
}

static void pool_stop_locked(void) {
    if (P.nworkers == 0) return;
    atomic_store(&P.quit, 1);
    atomic_fetch_add(&P.gen, 1);
    futex(&P.gen, FUTEX_WAKE_PRIVATE, INT_MAX);
    for (int i = 0; i < P.nworkers; i++) pthread_join(P.th[i], NULL);
    P.nworkers = 0;
    atomic_store(&P.quit, 0);
}

static void pool_start_locked(int threads) {
    P.start_gen = atomic_load(&P.gen);
    for (int i = 0; i < threads - 1; i++) {
        if (pthread_create(&P.th[i], NULL, worker_main, (void *)(intptr_t)(i + 1)) != 0) break;
        P.nworkers++;
    }
}

static int usable_cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static void atfork_child(void) {
    /* the workers do not exist in a forked child: forget them, start afresh on first use */
    P.nworkers = 0;
    atomic_store(&P.done, 0);
    atomic_store(&P.claim, 0);
    atomic_store(&P.sleepers, 0);
    pthread_mutex_init(&g_lock, NULL);
}

__attribute__((constructor)) static void pool_init(void) { pthread_atfork(NULL, NULL, atfork_child); }

void sp_pool_set_threads(int n) {
    pthread_mutex_lock(&g_lock);
    if (n <= 0) n = usable_cpus();
    if (n > MAX_THREADS) n = MAX_THREADS;
    if (n != g_threads) {
        pool_stop_locked();
        g_threads = n;
    }
    pthread_mutex_unlock(&g_lock);
}

int sp_pool_threads(void) {
    if (g_threads == 0) sp_pool_set_threads(0);
    return g_threads;
}

void sp_pool_set_spin(int us) { atomic_store(&g_spin_us, us < 0 ? 0 : us); }
int sp_pool_spin(void) { return atomic_load(&g_spin_us); }

void sp_pool_run(sp_pool_fn fn, void *arg, int nparts) {
    if (nparts <= 0) return;
    if (nparts == 1) {
        fn(arg, 0, 1);
        return;
    }
    pthread_mutex_lock(&g_lock);
    if (g_threads == 0) g_threads = usable_cpus();
    if (g_threads <= 1) {
        pthread_mutex_unlock(&g_lock);
        for (int p = 0; p < nparts; p++) fn(arg, p, nparts);
        return;
    }
    if (P.nworkers < g_threads - 1) {
        pool_stop_locked();
        pool_start_locked(g_threads);
    }
    uint32_t g = atomic_load(&P.gen) + 1;
    atomic_store_explicit(&P.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&P.arg, arg, memory_order_relaxed);
    atomic_store_explicit(&P.nparts, nparts, memory_order_relaxed);
    atomic_store_explicit(&P.done, 0, memory_order_relaxed);
    atomic_store_explicit(&P.claim, (uint64_t)g << 32, memory_order_release);
    atomic_store(&P.gen, g); /* seq_cst: pairs with the workers' sleepers increment */
    if (atomic_load(&P.sleepers) > 0) futex(&P.gen, FUTEX_WAKE_PRIVATE, INT_MAX);
    run_parts(g);
    int spins = 0;
    while (atomic_load_explicit(&P.done, memory_order_acquire) < nparts) {
        if (++spins > 4096) {
            sched_yield(); /* a worker holding a part was descheduled (shared machine): let it run */
        } else {
            CPU_RELAX();
        }
    }
    pthread_mutex_unlock(&g_lock);
}
