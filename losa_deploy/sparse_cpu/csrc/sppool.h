/* Internal: the kernels' thread pool (pool.c). Not part of the executor contract. */
#ifndef LOSA_SPPOOL_H
#define LOSA_SPPOOL_H

typedef void (*sp_pool_fn)(void *arg, int part, int nparts);

/* Run fn(arg, p, n) once for every p < n and return when all are done; the caller and the pool's workers claim the
 * parts dynamically (any part may run on any thread). Calls from several threads are serialised. */
void sp_pool_run(sp_pool_fn fn, void *arg, int nparts);
void sp_pool_set_threads(int n); /* n <= 0: all usable cores */
int sp_pool_threads(void);
void sp_pool_set_spin(int us);
int sp_pool_spin(void);

#endif
