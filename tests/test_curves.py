"""Training curves: one PNG, four panels, each recall panel drawing its own direction, the last the learning rate."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from dualenc.training.curves import curves_figure, plot_curves


def _history(epochs: int = 4) -> dict[str, list[float]]:
    """Every curve different, so a line drawn from the wrong key is caught."""
    rng = np.random.default_rng(0)
    keys = ["loss", "val_loss", "val_t2i_r1", "val_t2i_r10", "val_i2t_r1", "val_i2t_r10", "learning_rate",
            "scheduled_learning_rate"]
    return {key: list(rng.uniform(0, 100, epochs)) for key in keys}


def _lines(axis) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axis.get_lines()}


def test_each_panel_plots_its_own_keys():
    history = _history()
    figure = curves_figure(history)
    try:
        loss_axis, t2i_axis, i2t_axis, rate_axis = figure.axes
        epochs = [1, 2, 3, 4]
        # The base rate each epoch started with, at the epoch's start; the scheduled rate at its end.
        assert _lines(rate_axis) == {"base (epoch start)": ([0, 1, 2, 3], history["learning_rate"]),
                                     "towers (epoch end)": (epochs, history["scheduled_learning_rate"])}
        assert _lines(loss_axis) == {"train": (epochs, history["loss"]), "validation": (epochs, history["val_loss"])}
        assert _lines(t2i_axis) == {"R@1": (epochs, history["val_t2i_r1"]), "R@10": (epochs, history["val_t2i_r10"])}
        assert _lines(i2t_axis) == {"R@1": (epochs, history["val_i2t_r1"]), "R@10": (epochs, history["val_i2t_r10"])}
        assert "text -> image" in t2i_axis.get_title() and "image -> text" in i2t_axis.get_title()
    finally:
        plt.close(figure)


def test_missing_keys_are_left_out():
    figure = curves_figure({"loss": [3.0, 2.0], "val_t2i_r1": [10.0, 20.0]})
    try:
        loss_axis, t2i_axis, i2t_axis, rate_axis = figure.axes
        assert list(_lines(loss_axis)) == ["train"]
        assert _lines(rate_axis) == {}
        assert list(_lines(t2i_axis)) == ["R@1"]
        assert _lines(i2t_axis) == {}
    finally:
        plt.close(figure)


def test_plot_curves_writes_a_png_and_closes_its_figure(tmp_path):
    open_figures = plt.get_fignums()
    path = plot_curves(_history(), tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 3 * height  # four panels side by side
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["curves.png"]
    assert plt.get_fignums() == open_figures


def test_plot_curves_replaces_an_older_png(tmp_path):
    path = tmp_path / "curves.png"
    path.write_bytes(b"old")
    plot_curves({"loss": [1.0]}, path)
    assert path.read_bytes().startswith(b"\x89PNG")
