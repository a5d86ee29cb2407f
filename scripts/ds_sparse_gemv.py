"""Usage: python scripts/ds_sparse_gemv.py [OUT.json]

Does DeepSparse 1.8's fp32 sparse kernel speed up matrix-vector (decode-like) and matrix-matrix (prefill-like)
products? A chain of 8 square 4096x4096 MatMuls (512 MiB dense fp32, far beyond cache), dense vs 70% per-row
sparse, m = 1 and m = 128 rows, DeepSparse and ONNX Runtime, 2 threads."""
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from deepsparse import Engine
from onnx import TensorProto, helper, numpy_helper

K, L = 4096, 8
rng = np.random.default_rng(0)
def model(sparsity, m, path):
    nodes, inits = [], []
    prev = "x"
    for i in range(L):
        W = (rng.standard_normal((K, K)).astype(np.float32) / 64)
        if sparsity:
            k = int(round(sparsity * K))
            idx = np.argsort(rng.random((K, K)), axis=0)[:k]  # per output column (rows of W^T)
            np.put_along_axis(W, idx, 0.0, axis=0)
        inits.append(numpy_helper.from_array(W, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"y{i}"]))
        prev = f"y{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, K])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, m, K])], inits)
    mp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]); mp.ir_version = 8
    onnx.save(mp, path)

def timeit(fn, n):
    for _ in range(3): fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3

res = {}
d = tempfile.mkdtemp()
for m, n in ((1, 40), (128, 10)):
    x = rng.standard_normal((1, m, K)).astype(np.float32)
    for s in (0.0, 0.7):
        p = os.path.join(d, f"m{m}_s{s}.onnx"); model(s, m, p)
        so = ort.SessionOptions(); so.intra_op_num_threads = 2
        sess = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
        res[f"ort m={m} s={s}"] = timeit(lambda: sess.run(None, {"x": x}), n)
        eng = Engine(p, batch_size=1, num_cores=2)
        res[f"deepsparse m={m} s={s}"] = timeit(lambda: eng.run([x]), n)
        print({k: round(v, 2) for k, v in res.items()}, flush=True)
        del eng, sess
json.dump(res, open(sys.argv[1] if len(sys.argv) > 1 else "ds_sparse_gemv.json", "w"), indent=1)
