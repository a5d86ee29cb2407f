"""The compress stage: recipe -> calibration -> method (oneshot | losa | dense-lora) -> verified masks -> artefact.

Modules, in the order a run uses them: `recipe` (settings, validated once), `checks` (output room, model
shapes), `calibration`, `methods` (the interface and the shared `prune_pass`), `rates` (the one rate allocator;
`atp_tuning` searches ATP's beta), `prune` and `sequential` (the block walk), `oneshot`, `losa/`, `report` (the
manifest records) and `orchestrate` (`run_compress`).
"""

from .orchestrate import command_line, run_compress
from .recipe import Recipe

__all__ = ["Recipe", "command_line", "run_compress"]
