"""Child-process DeepSparse check: `python -m exporters._ds_probe SPEC.json`.

DeepSparse 1.8 aborts the whole process (a C++ assertion) on graphs it cannot compile, so the exporter compiles
and runs here, in a child, and turns a crash into a clean error. SPEC: {"onnx", "config_dir", "prefill_len",
"max_len", "threads", "prompt_ids", "new_tokens", "logits_npy"}. Prints one line `LOSA_PROBE {json}`: compile time,
each engine's repr (with DeepSparse's fraction_of_supported_ops), the greedy tokens; the prompt's logits go to
logits_npy.
"""

from __future__ import annotations

import json
import re
import sys
import time

import numpy as np


def _engine_info(eng) -> dict:
    r = repr(eng)
    info: dict = {"repr": r}
    m = re.search(r"'fraction_of_supported_ops':\s*([0-9.]+)", r)
    if m:
        info["fraction_of_supported_ops"] = float(m.group(1))
    return info


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    from transformers import AutoConfig

    from losa_deploy.runners import DeepSparseRunner

    cfg = AutoConfig.from_pretrained(spec["config_dir"])
    t = time.perf_counter()
    runner = DeepSparseRunner(spec["onnx"], cfg, spec["prefill_len"], spec["max_len"], spec["threads"])
    runner.ensure_decode()  # both engines inside compile_s
    compile_s = time.perf_counter() - t
    res: dict = {"compile_s": compile_s,
                 "engines": {"prefill": _engine_info(runner._engine(spec["prefill_len"])),
                             "decode": _engine_info(runner._engine(1))}}
    ids = np.array([spec["prompt_ids"]], dtype=np.int64)
    t = time.perf_counter()
    logits = runner.prefill(ids)
    res["prefill_s"] = time.perf_counter() - t
    np.save(spec["logits_npy"], logits[0])
    toks = []
    last = logits[0, -1]
    t = time.perf_counter()
    for i in range(spec["new_tokens"]):
        tok = int(np.argmax(last))
        toks.append(tok)
        if i + 1 < spec["new_tokens"]:
            last = runner.decode(tok)
    res["decode_s"] = time.perf_counter() - t
    res["tokens"] = toks
    print("LOSA_PROBE " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
