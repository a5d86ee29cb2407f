"""Cost of the masks-are-the-contract check (`losa_deploy.artifact.check_masks`) on a compressed checkpoint, against
the model load every consumer does anyway.

Usage: python scripts/measure_mask_check.py COMPRESSED_DIR [--pairs 7] [--json out.json]

Interleaved pairs (load, check in memory, check from the files), so machine noise hits both sides alike; prints the
median and min-max of each time and of the per-pair ratios check / load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import torch

    from losa_deploy.artifact import check_masks, load_masks, named_weights
    from losa_deploy.models import load_model

    masks = load_masks(a.model_dir)
    checked = sum(m.numel() for m in masks.values())
    rows = []
    for _ in range(a.pairs):
        t = time.perf_counter()
        model, _ = load_model(str(a.model_dir))
        load_s = time.perf_counter() - t
        weights = named_weights(model)
        t = time.perf_counter()
        check_masks(a.model_dir, weights)
        mem_s = time.perf_counter() - t
        del model, weights
        t = time.perf_counter()
        check_masks(a.model_dir)
        file_s = time.perf_counter() - t
        rows.append({"load_s": load_s, "check_in_memory_s": mem_s, "check_from_files_s": file_s})

    def stats(key: str) -> dict:
        v = [r[key] for r in rows]
        return {"median": statistics.median(v), "min": min(v), "max": max(v)}

    def ratio(key: str) -> dict:
        v = [r[key] / r["load_s"] for r in rows]
        return {"median": statistics.median(v), "min": min(v), "max": max(v)}

    res = {"model_dir": str(a.model_dir), "masked_tensors": len(masks), "mask_entries": checked,
           "torch_threads": torch.get_num_threads(), "pairs": a.pairs, "rows": rows,
           "load_s": stats("load_s"), "check_in_memory_s": stats("check_in_memory_s"),
           "check_from_files_s": stats("check_from_files_s"),
           "ratio_in_memory_to_load": ratio("check_in_memory_s"),
           "ratio_from_files_to_load": ratio("check_from_files_s")}
    for k in ("load_s", "check_in_memory_s", "check_from_files_s"):
        s = res[k]
        print(f"{k:22s} median {s['median']:.3f} s (min {s['min']:.3f}, max {s['max']:.3f})")
    for k in ("ratio_in_memory_to_load", "ratio_from_files_to_load"):
        s = res[k]
        print(f"{k:26s} median {s['median']:.3f} (min {s['min']:.3f}, max {s['max']:.3f})")
    print(f"{len(masks)} masked tensors, {checked / 1e6:.1f} M mask entries, {res['torch_threads']} torch threads")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
