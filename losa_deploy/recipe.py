"""Moved: the compress recipe is `losa_deploy.compress.recipe`, data-source checks are `losa_deploy.data`.

Kept only for `bench/run.py`'s `check_data_path` import until that import names `losa_deploy.data`.
"""

from .data import check_data_path

__all__ = ["check_data_path"]
