"""Statistics of a packed dataset: counts per split, their distributions, and bar charts.

Like seed 000's CUHK-PEDES statistics tool (identities, images per identity, captions per
image, drawn as bar charts with the value on each bar), but read from the packed TFRecords, so
it describes exactly what training will see, for any source. Records come from
`dualenc.data.packed.read_batches` with only ``caption``, ``image_id`` and ``label`` parsed; the image
bytes are never decoded, so a COCO-sized set takes seconds.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dualenc.core.files import save_figure_atomic, write_json_atomic  # noqa: E402
from dualenc.data.manifest import load_manifest  # noqa: E402
from dualenc.data.packed import read_batches  # noqa: E402
from dualenc.data.records import CAPTION, IMAGE_ID, LABEL  # noqa: E402

STATS_NAME = "stats.json"
# (stats key, chart file, x-axis label, what the bars count) for the per-split distributions.
DISTRIBUTIONS = (
    ("images_per_identity", "images_per_identity.png", "images per identity", "identities"),
    ("captions_per_image", "captions_per_image.png", "captions per image", "images"),
    ("caption_words", "caption_length.png", "caption length (words)", "captions"),
)
SPLIT_CHART = "identities_per_split.png"
# Over a wider range of values than this, value labels are written upright to fit...
UPRIGHT_LABEL_SPAN = 15
# ...and over a wider one than this they would still overlap, so they and per-value ticks go.
MAX_LABELLED_SPAN = 60


def write_stats(data_dir: Path, out_dir: Path | None = None) -> dict:
    """Count a packed dataset per split, print a table, save bar charts and ``stats.json``.

    Per split: ``pairs`` (records), ``images`` (distinct ``image_id``), ``identities``
    (distinct ``label``), ``mean_caption_words``, and three histograms mapping a value (as a
    string, so the dict survives JSON unchanged) to how often it occurs:
    ``images_per_identity`` (distinct images under one label -> number of labels),
    ``captions_per_image`` (records of one image -> number of images) and ``caption_words``
    (whitespace-separated words -> number of captions).

    Charts and ``stats.json`` go to `out_dir` (default ``data_dir/stats``), each written to a
    temporary name and renamed. Returns the dict that ``stats.json`` holds.
    """
    data_dir = Path(data_dir)
    out_dir = data_dir / "stats" if out_dir is None else Path(out_dir)
    splits = {split: _split_stats(data_dir, split) for split in load_manifest(data_dir).splits}
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = [_plot_split_sizes(splits, out_dir / SPLIT_CHART).name]
    for key, file_name, x_label, counted in DISTRIBUTIONS:
        charts.append(_plot_distribution(splits, key, x_label, counted, out_dir / file_name).name)
    stats = {"data_dir": str(data_dir), "splits": splits, "charts": charts}
    write_json_atomic(out_dir / STATS_NAME, stats)
    print(format_table(stats))
    return stats


def _split_stats(data_dir: Path, split: str) -> dict:
    """Counts and histograms of one split (a shard that cannot be read is named)."""
    captions_per_image: Counter[bytes] = Counter()
    images_of_identity: defaultdict[int, set[bytes]] = defaultdict(set)
    caption_words: Counter[int] = Counter()
    for batch in read_batches(data_dir, split, (CAPTION, IMAGE_ID, LABEL)):
        for caption, image_id, label in zip(batch[CAPTION], batch[IMAGE_ID], batch[LABEL]):
            captions_per_image[image_id] += 1
            images_of_identity[int(label)].add(image_id)
            # The packer joined each caption's words with single spaces.
            caption_words[len(caption.split())] += 1
    pairs = sum(captions_per_image.values())
    total_words = sum(words * count for words, count in caption_words.items())
    return {
        "pairs": pairs,
        "images": len(captions_per_image),
        "identities": len(images_of_identity),
        "mean_caption_words": round(total_words / pairs, 3) if pairs else 0.0,
        "images_per_identity": _histogram(len(images) for images in images_of_identity.values()),
        "captions_per_image": _histogram(captions_per_image.values()),
        "caption_words": _histogram(caption_words.elements()),
    }


def _histogram(values) -> dict[str, int]:
    """How often each integer occurs, keyed by the integer as a string, in ascending order."""
    counts = Counter(int(value) for value in values)
    return {str(value): counts[value] for value in sorted(counts)}


def format_table(stats: dict) -> str:
    """A plain-text summary: one row of counts per split, then each split's distributions."""
    header = (
        f"{'split':<12}{'pairs':>10}{'images':>10}{'identities':>12}"
        f"{'captions/image':>16}{'words/caption':>15}"
    )
    lines = [f"dataset {stats['data_dir']}", header, "-" * len(header)]
    for split, counts in stats["splits"].items():
        per_image = counts["pairs"] / counts["images"] if counts["images"] else 0.0
        lines.append(
            f"{split:<12}{counts['pairs']:>10}{counts['images']:>10}{counts['identities']:>12}"
            f"{per_image:>16.2f}{counts['mean_caption_words']:>15.2f}"
        )
    for split, counts in stats["splits"].items():
        lines.append("")
        for key, _, x_label, counted in DISTRIBUTIONS:
            pairs = ", ".join(f"{value}: {count}" for value, count in counts[key].items())
            lines.append(f"{split} {x_label} -> {counted}: {pairs or 'none'}")
    return "\n".join(lines)


def _label_bars(axis, bars, span: int) -> None:
    """Write each bar's height above it, if `span` (value positions on the x axis) leaves room."""
    if span <= UPRIGHT_LABEL_SPAN:
        axis.bar_label(bars, fontsize=8, padding=2)
    elif span <= MAX_LABELLED_SPAN:
        axis.bar_label(bars, fontsize=7, padding=2, rotation=90)


def _plot_split_sizes(splits: dict, path: Path) -> Path:
    """Grouped bars per split: pairs, images and identities, each labelled with its value."""
    names = list(splits)
    figure, axis = plt.subplots(figsize=(max(5.0, 1.8 * len(names) + 2), 4.2))
    width = 0.27
    for offset, key in enumerate(("pairs", "images", "identities")):
        positions = [index + (offset - 1) * width for index in range(len(names))]
        bars = axis.bar(positions, [splits[name][key] for name in names], width, label=key)
        _label_bars(axis, bars, span=len(names))
    axis.set_xticks(range(len(names)), names)
    axis.set_ylabel("count")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title("pairs, images and identities per split")
    axis.margins(y=0.15)
    axis.legend()
    return _save(figure, path)


def _plot_distribution(splits: dict, key: str, x_label: str, counted: str, path: Path) -> Path:
    """One panel per split, stacked: bar height = how many `counted` have each value of `key`."""
    names = list(splits)
    spans = [_span(splits[name][key]) for name in names]
    width = min(18.0, max(6.0, 0.3 * max(spans) + 2.5))
    figure, axes = plt.subplots(len(names), 1, figsize=(width, 3.6 * len(names)), squeeze=False)
    for axis, name, span in zip(axes[:, 0], names, spans):
        histogram = splits[name][key]
        values = [int(value) for value in histogram]
        bars = axis.bar(values, list(histogram.values()), width=0.8)
        _label_bars(axis, bars, span)
        if values and span <= MAX_LABELLED_SPAN:
            axis.set_xticks(range(values[0], values[-1] + 1))
        else:
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel(x_label)
        axis.set_ylabel(counted)
        axis.set_title(f"{name}: {sum(histogram.values())} {counted} by {x_label}")
        axis.margins(y=0.18 if span <= UPRIGHT_LABEL_SPAN else 0.25)
    return _save(figure, path)


def _span(histogram: dict[str, int]) -> int:
    """How many integer positions the histogram's values cover on the x axis (1 if empty)."""
    values = [int(value) for value in histogram]
    return max(values) - min(values) + 1 if values else 1


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    return save_figure_atomic(figure, path)


