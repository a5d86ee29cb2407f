/* A small persistent thread pool for the sparse kernels.
 *
 * Why not OpenMP: PyTorch in the same process ships its own libgomp; two OpenMP runtimes spinning on a 2-core VM
 * stall each other. This pool has the caller run part 0 itself and n-1 workers run the other parts. Workers spin
 * briefly (sp_set_spin, default 100 us) on a generation counter, then sleep on a futex, so back-to-back kernel calls
 * (the executor makes ~200 per token) cost well under a microsecond to dispatch while an idle process burns no CPU.
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

static struct {
    pthread_t th[MAX_THREADS];
    int nworkers;              /* workers started (threads - 1) */
    _Atomic uint32_t gen;      /* bumped once per job (and on shutdown) */
    _Atomic int pending;       /* workers that have not finished the current job */
    _Atomic int sleepers;      /* workers inside futex_wait */
    _Atomic int quit;
    uint32_t start_gen;
    sp_pool_fn fn;
    void *arg;
    int nparts;
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

static void *worker_main(void *p) {
    int id = (int)(intptr_t)p;
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
        if (id < P.nparts) P.fn(P.arg, id, P.nparts);
        atomic_fetch_sub_explicit(&P.pending, 1, memory_order_release);
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
    atomic_store(&P.pending, 0);
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
    if (nparts <= 1) {
        fn(arg, 0, 1);
        return;
    }
    pthread_mutex_lock(&g_lock);
    if (g_threads == 0) {
        g_threads = usable_cpus();
    }
    if (nparts > g_threads) nparts = g_threads;
    if (P.nworkers < g_threads - 1) {
        pool_stop_locked();
        pool_start_locked(g_threads);
    }
    if (nparts > P.nworkers + 1) nparts = P.nworkers + 1; /* thread creation failed: run with fewer */
    P.fn = fn;
    P.arg = arg;
    P.nparts = nparts;
    atomic_store_explicit(&P.pending, P.nworkers, memory_order_relaxed);
    atomic_fetch_add(&P.gen, 1); /* seq_cst: pairs with the workers' sleepers increment */
    if (atomic_load(&P.sleepers) > 0) futex(&P.gen, FUTEX_WAKE_PRIVATE, INT_MAX);
    fn(arg, 0, nparts);
    int spins = 0;
    while (atomic_load_explicit(&P.pending, memory_order_acquire) > 0) {
        if (++spins > 4096) {
            sched_yield(); /* a worker was descheduled (shared machine): let it run */
        } else {
            CPU_RELAX();
        }
    }
    pthread_mutex_unlock(&g_lock);
}
