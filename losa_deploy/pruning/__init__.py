"""Pure pruning math: scores, keep-masks (True = keep) and SparseGPT. No model, no I/O."""

from .masks import (
    Pattern,
    mask_from_scores,
    mixed_n_per_block,
    nm_mask,
    parse_pattern,
    prune_count,
    unstructured_row_mask,
)
from .scores import magnitude_scores, wanda_scores
from .sparsegpt import sparsegpt_prune

__all__ = [
    "Pattern",
    "magnitude_scores",
    "mask_from_scores",
    "mixed_n_per_block",
    "nm_mask",
    "parse_pattern",
    "prune_count",
    "sparsegpt_prune",
    "unstructured_row_mask",
    "wanda_scores",
]
