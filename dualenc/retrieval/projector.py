"""A gallery's embedding space for TensorBoard's projector: ``tensorboard --logdir DIR``.

`write_projector` writes into DIR what the projector plugin (`tensorboard.plugins.projector`)
reads, every path in its config relative to DIR, since the plugin refuses assets outside it:

- ``embeddings.tsv``: one row per gallery image, its embedding as tab-separated floats. The
  config names it as the embedding's ``tensor_path``, so no TensorFlow checkpoint is needed;
- ``metadata.tsv``: a header row ``id	caption	label`` (a header, because there are several
  columns), then one row per image: image_id, first caption, label (empty where the gallery
  has none, as a folder has neither). Tabs and line breaks inside a caption become spaces;
- ``sprite.png``: each image's thumbnail in row order, ``grid_shape`` cells wide, decoded by
  `dualenc.data.images.decode_rgb` (the pixels the vision encoder saw), its aspect ratio kept on
  a white square cell. The projector refuses sprites over `SPRITE_LIMIT` pixels a side, so the
  cells shrink as the gallery grows (64 px up to 16,384 images, 8 px at a million);
- ``projector_config.pbtxt``: the plugin's `ProjectorConfig` naming the three files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from dualenc.core.errors import DualEncError
from dualenc.core.files import atomic_file
from dualenc.data.images import ImageProblem, decode_rgb
from dualenc.retrieval.grid import grid_shape

if TYPE_CHECKING:  # annotations only: the index module loads the exported-encoder code
    from dualenc.retrieval.gallery import Gallery
    from dualenc.retrieval.index import GalleryIndex

CONFIG_NAME = "projector_config.pbtxt"  # the name the plugin looks for (its metadata.PROJECTOR_FILENAME)
EMBEDDINGS_NAME = "embeddings.tsv"
METADATA_NAME = "metadata.tsv"
SPRITE_NAME = "sprite.png"
METADATA_COLUMNS = ("id", "caption", "label")
SPRITE_LIMIT = 8192  # the projector's largest sprite side, in pixels
MAX_THUMBNAIL = 64  # larger cells add little at the projector's point sizes and slow its loading
# Images read at a time: bounds memory, at the price of one scan of a packed split per batch.
READ_BATCH = 1024


def check_projector_directory(directory: str | Path) -> Path:
    """`directory` if the projector's files can be written there (it may not exist yet), else
    a one-line `DualEncError`. Cheap, so a CLI checks it before any work."""
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise DualEncError(f"--projector {directory} is a file; pass a directory (it is created if missing)")
    existing = next(parent for parent in (directory, *directory.parents) if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise DualEncError(f"cannot write the projector files in {directory}: {existing} is not a writable directory")
    return directory


def thumbnail_size(count: int) -> int:
    """Side in pixels of each square sprite cell for `count` images: at most `MAX_THUMBNAIL`,
    and small enough that the `grid_shape` grid fits in `SPRITE_LIMIT` × `SPRITE_LIMIT`."""
    rows, columns = grid_shape(count)
    size = min(MAX_THUMBNAIL, SPRITE_LIMIT // max(rows, columns))
    if size < 1:
        raise DualEncError(f"a gallery of {count} images is too large for the projector's sprite "
                           f"(at most {SPRITE_LIMIT ** 2} images of one pixel)")
    return size


def _clean(value: object) -> str:
    """A metadata cell: empty for None, tabs and line breaks as spaces (they delimit the TSV)."""
    return "" if value is None else " ".join(str(value).split())


def _thumbnail(pixels: np.ndarray, size: int) -> Image.Image:
    """`pixels` (H, W, 3) scaled to fit a `size` square (small images grow too, so every cell is
    filled alike), aspect kept, centred on white."""
    image = ImageOps.contain(Image.fromarray(pixels), (size, size), Image.Resampling.LANCZOS)
    cell = Image.new("RGB", (size, size), "white")
    cell.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return cell


def sprite_image(gallery: Gallery, image_ids: list[str], size: int) -> Image.Image:
    """The sprite of `image_ids` (row-major, `grid_shape` columns) read from `gallery`, cells of
    `size` pixels; a `DualEncError` when an image indexed earlier can no longer be read."""
    rows, columns = grid_shape(len(image_ids))
    sprite = Image.new("RGB", (columns * size, rows * size), "white")
    for start in range(0, len(image_ids), READ_BATCH):
        wanted = image_ids[start : start + READ_BATCH]
        try:
            blobs = gallery.read_images(wanted)
            cells = [_thumbnail(decode_rgb(blobs[image_id]), size) for image_id in wanted]
        except (OSError, KeyError, ImageProblem) as problem:  # changed since it was indexed
            raise DualEncError(f"cannot draw the projector's sprite from {gallery.description} ({problem}); "
                               "re-index the gallery with --build-index") from None
        for position, cell in enumerate(cells, start):
            sprite.paste(cell, ((position % columns) * size, (position // columns) * size))
    return sprite


def projector_config(name: str, count: int, dimension: int, size: int):
    """The plugin's `ProjectorConfig` for one embedding called `name`, (count, dimension), whose
    sprite cells are `size` pixels square."""
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = name
    embedding.tensor_path = EMBEDDINGS_NAME
    embedding.tensor_shape.extend([count, dimension])
    embedding.metadata_path = METADATA_NAME
    embedding.sprite.image_path = SPRITE_NAME
    embedding.sprite.single_image_dim.extend([size, size])
    return config


def write_projector(directory: str | Path, gallery: Gallery, index: GalleryIndex) -> Path:
    """Write the projector's four files (module docstring) for `index`, the gallery index of
    `gallery`, into `directory` (created if missing); returns the config's path."""
    from google.protobuf import text_format

    directory = check_projector_directory(directory)
    if len(index) == 0:
        raise DualEncError(f"{gallery.description} has no indexed images to project")
    directory.mkdir(parents=True, exist_ok=True)
    embeddings = np.asarray(index.embeddings, np.float32)
    size = thumbnail_size(len(index))
    with atomic_file(directory / EMBEDDINGS_NAME) as staging:
        np.savetxt(staging, embeddings, fmt="%.7g", delimiter="\t")
    captions = index.captions or [None] * len(index)
    labels = index.labels or [None] * len(index)
    lines = ["\t".join(METADATA_COLUMNS)]
    lines += ["\t".join(map(_clean, row)) for row in zip(index.image_ids, captions, labels)]
    with atomic_file(directory / METADATA_NAME) as staging:
        staging.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sprite = sprite_image(gallery, list(index.image_ids), size)
    with atomic_file(directory / SPRITE_NAME) as staging:
        sprite.save(staging, format="PNG")
    config = projector_config(gallery.description, len(index), embeddings.shape[1], size)
    with atomic_file(directory / CONFIG_NAME) as staging:
        staging.write_text(text_format.MessageToString(config), encoding="utf-8")
    return directory / CONFIG_NAME
