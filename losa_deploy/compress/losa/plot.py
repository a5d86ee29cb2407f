"""`losa_schedule.png`: per-block sparsity and adapter rank at every LoSA step (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def plot_schedule(steps: Sequence[dict[str, Any]], path: Path, title: str = "LoSA schedule") -> Path:
    """Two panels: block sparsity (one line per step) and block rank (one line per step); written atomically."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    cmap = plt.get_cmap("viridis")
    T = max(1, len(steps))
    for k, st in enumerate(steps):
        c = cmap(k / max(1, T - 1))
        x = list(range(len(st["block_rates"])))
        ax1.plot(x, st["block_rates"], marker=".", color=c, label=f"t={st['step']}: S={st['sparsity_target']:.3f}")
        ax2.step(x, st["block_ranks"], where="mid", color=c, label=f"t={st['step']}: Ω={st['omega']:.2f}")
    ax1.set_ylabel("block sparsity")
    ax2.set_ylabel("adapter rank")
    ax2.set_xlabel("block")
    ax1.legend(fontsize=7, ncol=2)
    ax2.legend(fontsize=7, ncol=2)
    ax1.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
