"""`bench`: latency (per runtime and phase) and accuracy of a sparse model against its dense baseline, as a report.

The orchestration lives in `run.py` (`run_bench(BenchOptions)`, `run_compare`); this package re-exports its public
names. Timing: `latency.py`, `timing.py`; bounds: `bounds.py`; kernels: `kernels.py`; report: `report.py`.
"""

from .run import (
    CPU_RUNTIMES, GPU_RUNTIMES, ALL_RUNTIMES, ONNX_RUNTIMES, SPARSE_CPU, BenchOptions, parse_int_list, VARIANTS,
    parse_runtimes, split_variants, parse_tasks, architecture, check_same_architecture, check_bench_architecture,
    sparse_cpu_available, runtime_available, select_runtimes, onnx_runtimes_for, sparse_cpu_for, model_facts,
    block_sparsity, needed_max_len, ensure_deepsparse_export, ensure_sparse_cpu_export, model_path_for,
    make_factory, kernel_timing, MEMORY_SHARE, side_bytes, check_memory, latency_suite, accuracy, run_bench,
    check_inputs, run_compare,
)

__all__ = [
    "CPU_RUNTIMES", "GPU_RUNTIMES", "ALL_RUNTIMES", "ONNX_RUNTIMES", "SPARSE_CPU", "BenchOptions",
    "parse_int_list", "VARIANTS", "parse_runtimes", "split_variants", "parse_tasks", "architecture",
    "check_same_architecture", "check_bench_architecture", "sparse_cpu_available", "runtime_available",
    "select_runtimes", "onnx_runtimes_for", "sparse_cpu_for", "model_facts", "block_sparsity", "needed_max_len",
    "ensure_deepsparse_export", "ensure_sparse_cpu_export", "model_path_for", "make_factory", "kernel_timing",
    "MEMORY_SHARE", "side_bytes", "check_memory", "latency_suite", "accuracy", "run_bench", "check_inputs",
    "run_compare",
]
