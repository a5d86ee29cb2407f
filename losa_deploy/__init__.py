"""losa-deploy: prune a dense causal LM (Wanda/SparseGPT, ATP/OWL/RMI, LoSA), export it, prove it fast."""

__version__ = "0.1.0"
