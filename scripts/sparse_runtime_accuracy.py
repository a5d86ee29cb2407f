"""How far sparse-cpu's logits are from PyTorch fp32, next to PyTorch fp32's own distance from float64 and between
thread counts (the fp32 noise floor a tolerance must sit above).

  python scripts/sparse_runtime_accuracy.py MODEL_DIR      # a checkpoint with sparsity_masks.safetensors
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from exporters.common import load_source
from exporters.sparse_cpu_export import read_masks
from exporters.verify import prompt_ids
from losa_deploy.sparse_cpu.runtime import SparseCpuRunner, packed_from_model


def main(model_dir: str) -> None:
    model, tok = load_source(model_dir, "float32", "eager")
    masks, _ = read_masks(model_dir, model)
    ids = torch.from_numpy(prompt_ids(tok, 64))
    with torch.inference_mode():
        torch.set_num_threads(2)
        l32 = model(input_ids=ids).logits[0].numpy()
        torch.set_num_threads(1)
        l32_1 = model(input_ids=ids).logits[0].numpy()
        torch.set_num_threads(2)
        l64 = model.double()(input_ids=ids).logits[0].numpy()
        model.float()
    got = SparseCpuRunner(packed_from_model(model, masks), threads=2).prefill(ids.numpy())[0]

    def d(a: np.ndarray, b: np.ndarray) -> str:
        return f"{np.abs(a.astype(np.float64) - b).max():.2e}"

    print(f"prompt tokens {ids.shape[1]}, max |logit| {np.abs(l64).max():.1f}")
    print(f"torch fp32 (2 threads) vs float64: {d(l32, l64)}; torch fp32 1 vs 2 threads: {d(l32_1, l32)}")
    print(f"sparse-cpu vs float64: {d(got, l64)}; sparse-cpu vs torch fp32: {d(got, l32)}")


if __name__ == "__main__":
    main(sys.argv[1])
