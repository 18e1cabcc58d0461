"""Gallery images by id, for the page's result grid: read safely, shrunk, and cached in memory.

Only ids in the index are served; a request never names a path. A folder gallery's file is
read only if its real path (links followed) is still inside the gallery folder, so a symbolic
link that leads out of it serves nothing. A packed split is read at the offsets of its
images' first records, found once when the service starts by `dualenc.data.packed.first_records`
(one pass over the shards, parsing only the image ids; the rule every index is built by): a
later request reads one record, not the whole split. Those offsets hold only for the shard files
they were found in, so each shard's (size, mtime, inode) is recorded before it is read and
checked on the open file at each request: a split packed again under a running service is
refused (404, one line) rather than serving other images' bytes. Thumbnails are re-encoded by
Pillow, so what goes out is always a JPEG made from decoded pixels, never a file's raw bytes.
"""

from __future__ import annotations

import collections
import io
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import tensorflow as tf
from PIL import Image

from dualenc.retrieval.gallery import FolderGallery, Gallery
from dualenc.data.images import ImageProblem, decode_rgb
from dualenc.data.manifest import load_manifest
from dualenc.data.packed import first_records
from dualenc.data.records import IMAGE, IMAGE_ID

THUMBNAIL_SIDE = 256
THUMBNAIL_QUALITY = 85
THUMBNAIL_CACHE_ENTRIES = 2048


class ImageUnavailable(Exception):
    """An image id the service does not serve: not in the gallery, unreadable, or leading out of it."""


class FolderImages:
    """Files of a folder gallery, by index id (the path relative to the folder)."""

    def __init__(self, directory: Path, image_ids: Iterable[str]):
        self.root = Path(directory).resolve()
        self.image_ids = frozenset(image_ids)

    def read(self, image_id: str) -> bytes:
        if image_id not in self.image_ids:
            raise ImageUnavailable(f"no image {image_id[:200]!r} in this gallery")
        try:
            path = (self.root / image_id).resolve(strict=True)
        except (OSError, RuntimeError):
            raise ImageUnavailable(f"gallery image {image_id!r} is no longer readable") from None
        if not path.is_relative_to(self.root):
            raise ImageUnavailable(f"gallery image {image_id!r} is a link out of the gallery folder; it is not served")
        try:
            return path.read_bytes()
        except OSError:
            raise ImageUnavailable(f"gallery image {image_id!r} is no longer readable") from None


class PackedImages:
    """Images of one packed split, by image id, each read from its first record."""

    def __init__(self, data_dir: Path, split: str, image_ids: Iterable[str]):
        wanted = set(image_ids)
        # Taken before the offsets are read: a shard replaced meanwhile then fails the check too.
        self.shard_stats = {Path(data_dir) / name: _identity(os.stat(Path(data_dir) / name))
                            for name in load_manifest(data_dir).split(split, data_dir).shards}
        self.locations: dict[str, tuple[Path, int, int]] = {}
        for record in first_records(data_dir, split):
            image_id = record.features[IMAGE_ID].decode("utf-8")
            if image_id in wanted:
                self.locations[image_id] = (record.path, record.offset, record.length)

    def read(self, image_id: str) -> bytes:
        location = self.locations.get(image_id)
        if location is None:
            raise ImageUnavailable(f"no image {image_id[:200]!r} in this gallery")
        shard, offset, length = location
        try:
            with open(shard, "rb") as stream:
                if _identity(os.fstat(stream.fileno())) != self.shard_stats.get(shard):
                    raise ImageUnavailable(f"gallery image {image_id!r}: {shard.name} was packed again after the "
                                           "service started; restart the service to serve the new split")
                stream.seek(offset)
                data = stream.read(length)
            return tf.train.Example.FromString(data).features.feature[IMAGE].bytes_list.value[0]
        except (OSError, IndexError, ValueError):
            raise ImageUnavailable(f"gallery image {image_id!r} is no longer readable") from None


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """A file's (size, mtime, device, inode): which file, and which version of it."""
    return stat.st_size, stat.st_mtime_ns, stat.st_dev, stat.st_ino


def gallery_images(gallery: Gallery, image_ids: Iterable[str]) -> FolderImages | PackedImages:
    """The reader for `gallery`, serving exactly `image_ids` (the index's rows).

    The one place the service tells galleries apart: serving needs what `Gallery.read_images`
    does not give, a containment check for folders and record offsets for packed splits.
    """
    if isinstance(gallery, FolderGallery):
        return FolderImages(gallery.directory, image_ids)
    return PackedImages(gallery.data_dir, gallery.split, image_ids)


def make_thumbnail(image_bytes: bytes, max_side: int = THUMBNAIL_SIDE) -> bytes:
    """An RGB JPEG of the image, its longer side at most `max_side` (never enlarged).

    Decoded by the one shared decoder (`dualenc.data.images.decode_rgb`: EXIF orientation, 16-bit,
    palettes), so the page shows the pixels that were embedded.
    """
    thumbnail = Image.fromarray(decode_rgb(image_bytes))
    thumbnail.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumbnail.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


class Thumbnails:
    """Thumbnails of gallery images by id: made on first request, the latest `capacity` kept."""

    def __init__(self, images: FolderImages | PackedImages, capacity: int = THUMBNAIL_CACHE_ENTRIES):
        self.images = images
        self.capacity = capacity
        self._cache: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, image_id: str) -> bytes:
        with self._lock:
            if image_id in self._cache:
                self._cache.move_to_end(image_id)
                return self._cache[image_id]
        image_bytes = self.images.read(image_id)
        try:
            thumbnail = make_thumbnail(image_bytes)
        except ImageProblem:
            raise ImageUnavailable(f"gallery image {image_id!r} cannot be decoded") from None
        with self._lock:
            self._cache[image_id] = thumbnail
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return thumbnail
