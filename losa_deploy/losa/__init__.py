"""LoSA: dynamic low-rank sparse adaptation (METHODS §4). Entry point: `losa_deploy.losa.run.run_losa`."""

from .run import LosaResult, run_losa, validate_losa

__all__ = ["LosaResult", "run_losa", "validate_losa"]
