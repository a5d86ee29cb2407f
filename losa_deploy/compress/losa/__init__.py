"""LoSA: dynamic low-rank sparse adaptation (METHODS §4), and the dense-lora baseline it is compared with.

Entry points (the method interface of `..methods`): `run.run_losa`, `baseline.run_dense_lora`.
"""
