"""`bench`: latency (per runtime and phase) and accuracy of a sparse model against its dense baseline, as a report.

The modules, imported by their names: `run` (the orchestration: `run_bench(BenchOptions)`, `run_compare`, runtime
selection and the cached exports), `latency` and `timing` (the timed phases), `pairs` (interleaved A/B statistics),
`bounds` (memory-bandwidth and FLOP bounds), `kernels` (sparse-cpu kernel timing), `shapes` (synthetic blocks) and
`report` (report.json / report.md and plots).
"""
