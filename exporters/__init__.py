"""Exporters: ONNX (optimum), DeepSparse (wrapper-traced KV graph), TensorRT-ready fp16 ONNX with a 2:4 report,
and a compressed-tensors sparse Hugging Face checkpoint. Each takes a Hugging Face causal-LM directory and writes one
directory with an export_manifest.json that records how the export was verified."""
