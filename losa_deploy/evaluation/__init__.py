"""Accuracy: perplexity (literature protocol) and zero-shot tasks (lm-evaluation-harness)."""
