"""The compressed checkpoint's files now live in `losa_deploy.artifact` (the output-directory contract); these names
stay importable from here."""

from .artifact import MASKS_NAME, has_masks, load_masks, save_checkpoint, save_masks  # noqa: F401
