"""Training curves: loss and retrieval recall per epoch, as one PNG.

Seed 000 drew top-1/top-10 curves for both directions but plotted the image->text top-10
curve again in the text->image panel; here each panel reads only its own direction's keys.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.figure import Figure  # noqa: E402

from dualenc.core.files import save_figure_atomic  # noqa: E402

# (panel title, history key prefix) for the two retrieval directions.
DIRECTIONS = (("text -> image", "val_t2i"), ("image -> text", "val_i2t"))


def curves_figure(history: dict[str, list[float]]) -> Figure:
    """Four panels against epoch: loss (train and validation), R@1/R@10 text->image, then
    image->text, and the learning rate.

    `history` maps Keras log names (``loss``, ``val_loss``, ``val_t2i_r1``, ``val_t2i_r10``,
    ``val_i2t_r1``, ``val_i2t_r10``) and the run's rates (``learning_rate``, the base rate each
    epoch started with; ``scheduled_learning_rate``, the towers' rate at its end) to one value
    per epoch; missing keys are left out. The caller closes the figure.
    """
    figure, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    loss_axis = axes[0]
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        if history.get(key):
            loss_axis.plot(range(1, len(history[key]) + 1), history[key], marker="o", label=label)
    loss_axis.set_title("loss")
    for axis, (title, prefix) in zip(axes[1:], DIRECTIONS):
        for k in (1, 10):
            values = history.get(f"{prefix}_r{k}")
            if values:
                axis.plot(range(1, len(values) + 1), values, marker="o", label=f"R@{k}")
        axis.set_title(f"{title} recall (%)")
        axis.set_ylim(0, 100)
    rate_axis = axes[3]
    for key, label, start in (("learning_rate", "base (epoch start)", 0), ("scheduled_learning_rate", "towers (epoch end)", 1)):
        if history.get(key):
            rate_axis.plot([epoch + start for epoch in range(len(history[key]))], history[key], marker="o", label=label)
    rate_axis.set_title("learning rate")
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    return figure


def plot_curves(history: dict[str, list[float]], path: str | Path) -> Path:
    """Write `curves_figure(history)` as a PNG at `path`.

    Written to a temporary name and renamed, so a reader never sees half a PNG.
    """
    return save_figure_atomic(curves_figure(history), path)
