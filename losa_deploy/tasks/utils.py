"""Python hooks for the shipped task YAMLs: the harness's own functions, re-exported so scoring is the harness's.

Referenced from the YAMLs as `!function utils.<name>` (lm-eval resolves the module next to the YAML file).
"""

from __future__ import annotations

from lm_eval.tasks.hellaswag.utils import preprocess as hellaswag_preprocess  # noqa: F401
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice as winogrande_doc_to_choice  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target as winogrande_doc_to_target  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_text as winogrande_doc_to_text  # noqa: F401
