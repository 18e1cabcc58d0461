"""Command line: ``python -m tfrecords_tools {coco,karpathy,cuhk-pedes,icfg-pedes,rstpreid,folder,stats,make-demo}``.

Each packer writes ``{split}-{index}-of-{count}.tfrecord`` shards and ``manifest.json`` into
``--out``. Re-running the same command resumes an interrupted run (or does nothing when it
finished); an ``--out`` holding another dataset is refused unless ``--overwrite`` is given.
Heavy modules are imported inside the subcommands, so worker processes and ``--help`` start fast,
and TensorFlow only after the annotations, flags and ``--out`` were checked: a mistake there is
reported within a second, and TensorFlow's start-up chatter stays off the terminal unless
``--verbose`` (or ``DUALENC_TF_LOG=1``) asks for it (`dualenc.core.startup`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from dualenc.core.errors import DualEncError

if TYPE_CHECKING:
    from dualenc.data.images import StoreSize

DEFAULT_COCO_DOWNLOAD = Path("data") / "coco"
# What writing into a read-only, forbidden or full place raises: the user's to fix, not a bug.
UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


def _absolute(path: str) -> Path:
    return Path(path).expanduser().resolve()


def _existing(flag: str, path: Path, kind: str) -> Path:
    checks = {"file": path.is_file, "directory": path.is_dir}
    if not checks[kind]():
        raise DualEncError(f"{flag} {path}: no such {kind}")
    return path


@contextlib.contextmanager
def _writing(flag: str, path: Path) -> Iterator[None]:
    """Turn a failure to write under `path` (read-only, no permission, disk full) into one line."""
    try:
        yield
    except OSError as error:
        if error.errno not in UNWRITABLE:
            raise
        raise DualEncError(f"cannot write to {flag} {path} ({error.strerror}); "
                           f"choose a writable {flag} with free space") from None


def _store_size(args: argparse.Namespace) -> StoreSize:
    """What `--max-side` and `--preset` allow an image to be stored at, checked before the
    annotations are read."""
    from dualenc.data.images import StoreSize
    from dualenc.training.presets import stored_image_cover

    return StoreSize(args.max_side, None if args.preset is None else stored_image_cover(args.preset))


def _pack(splits_and_skipped: tuple, args: argparse.Namespace, source: dict) -> int:
    from tfrecords_tools.writer import pack

    splits, skipped = splits_and_skipped
    size = args.store_size
    if args.runner is not None:
        from tfrecords_tools.beam_pack import pack_with_beam

        pack_with_beam(splits, _absolute(args.out), source, args.beam_options, skipped=skipped,
                       size=size, max_image_bytes=args.max_image_bytes, shard_size=args.shard_size,
                       overwrite=args.overwrite)
        return 0
    pack(splits, _absolute(args.out), source, skipped=skipped, size=size,
         max_image_bytes=args.max_image_bytes, shard_size=args.shard_size, workers=args.workers,
         overwrite=args.overwrite, verbose=args.verbose)
    return 0


def _run_coco(args: argparse.Namespace) -> int:
    from tfrecords_tools import coco

    annotations, images = args.annotations, args.images
    if args.download is not None:
        from tfrecords_tools.download import download_coco

        downloaded_annotations, downloaded_images = download_coco(_absolute(args.download))
        annotations = annotations or str(downloaded_annotations)
        images = images or str(downloaded_images)
    if annotations is None or images is None:
        raise DualEncError("coco needs --annotations and --images, or --download to fetch them")
    annotations = _existing("--annotations", _absolute(annotations), "file")
    images = _existing("--images", _absolute(images), "directory")
    karpathy = _existing("--karpathy", _absolute(args.karpathy), "file") if args.karpathy else None
    source = {"format": "coco", "annotations": str(annotations), "images": str(images)}
    if karpathy is not None:
        source["karpathy"] = str(karpathy)
    loaded = coco.load(annotations, images, split=args.split, holdout_images=args.holdout_images,
                       captions_per_image=args.captions_per_image, karpathy=karpathy,
                       allow_outside_images=args.allow_outside_images)
    return _pack(loaded, args, source)


def _run_cuhk_pedes(args: argparse.Namespace) -> int:
    from tfrecords_tools import cuhk_pedes

    annotations = _existing("--annotations", _absolute(args.annotations), "file")
    images = _existing("--images", _absolute(args.images), "directory")
    source = {"format": "cuhk-pedes", "annotations": str(annotations), "images": str(images)}
    return _pack(cuhk_pedes.load(annotations, images, args.default_split, args.allow_outside_images), args, source)


def _run_karpathy(args: argparse.Namespace) -> int:
    from tfrecords_tools import karpathy

    annotations = _existing("--annotations", _absolute(args.annotations), "file")
    images = _existing("--images", _absolute(args.images), "directory")
    splits = tuple(split.strip() for split in args.splits.split(","))
    grouped, skipped, dataset = karpathy.load(annotations, images, restval=args.restval, splits=splits,
                                              captions_per_image=args.captions_per_image,
                                              allow_outside_images=args.allow_outside_images)
    source = {"format": "karpathy", "annotations": str(annotations), "images": str(images),
              "dataset": dataset, "restval": args.restval}
    return _pack((grouped, skipped), args, source)


def _run_person_set(args: argparse.Namespace) -> int:
    from tfrecords_tools import icfg_pedes, rstpreid

    loaders = {"icfg-pedes": icfg_pedes.load, "rstpreid": rstpreid.load}
    annotations = _existing("--annotations", _absolute(args.annotations), "file")
    images = _existing("--images", _absolute(args.images), "directory")
    source = {"format": args.command, "annotations": str(annotations), "images": str(images)}
    return _pack(loaders[args.command](annotations, images, args.allow_outside_images), args, source)


def _run_folder(args: argparse.Namespace) -> int:
    from tfrecords_tools import folder

    captions = _existing("--captions", _absolute(args.captions), "file")
    images = _existing("--images", _absolute(args.images), "directory")
    source = {"format": "folder", "annotations": str(captions), "images": str(images)}
    return _pack(folder.load(captions, images, args.allow_outside_images), args, source)


def _run_stats(args: argparse.Namespace) -> int:
    from dualenc.data.manifest import load_manifest
    from dualenc.core.startup import import_tensorflow

    data_dir = _absolute(args.data_dir)
    load_manifest(data_dir)  # a missing or broken manifest is reported before TensorFlow loads
    import_tensorflow(args.verbose)
    from tfrecords_tools.stats import write_stats

    out_dir = _absolute(args.out) if args.out else data_dir / "stats"
    with _writing("--out", out_dir):
        write_stats(data_dir, out_dir)
    return 0


def _run_make_demo(args: argparse.Namespace) -> int:
    from dualenc.core import jsonfiles
    from tfrecords_tools.demo import IMAGES_DIR, MARKER_NAME, REID_RAW_NAME, make_demo

    options = {"seed": args.seed}
    if args.identities is not None:
        options["identities"] = args.identities
    with _writing("--out", _absolute(args.out)):
        made = make_demo(_absolute(args.out), **options)
    counts = jsonfiles.load_file(made / MARKER_NAME, "demo marker")["counts"]
    for split, split_counts in counts.items():
        print(f"{split}: " + ", ".join(f"{value} {name}" for name, value in split_counts.items()))
    print(f"demo dataset (CUHK-PEDES layout) in {made}; pack it with: python -m tfrecords_tools "
          f"cuhk-pedes --annotations {made / REID_RAW_NAME} --images {made / IMAGES_DIR} --out DIR")
    return 0


def _packer_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    parser.add_argument("--max-side", "--resize", dest="max_side", type=int, metavar="S",
                        help="store images whose longer side exceeds S pixels scaled down to S, as JPEG "
                             "(quality 95); --resize is its older name")
    parser.add_argument("--preset", metavar="NAME",
                        help="the train.py preset the pack is for: images larger than it takes to cover its "
                             "input (demo: 64x32) are stored scaled down, so training decodes small JPEGs")
    parser.add_argument("--shard-size", type=int, metavar="N",
                        help="records per shard, whole images only (default: 2000, seed 003's shards)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="threads reading images (default: one per core, %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different dataset already packed in --out")
    parser.add_argument("--allow-outside-images", action="store_true",
                        help="read image paths of the annotations that resolve outside --images "
                             "(../, absolute paths, symlinks out); refused by default")
    parser.add_argument("--max-image-bytes", type=int, metavar="N",
                        help="skip image files larger than N bytes (default: 67108864, 64 MiB)")
    parser.add_argument("--runner", metavar="NAME",
                        help="pack with an Apache Beam pipeline on this runner (DirectRunner, DataflowRunner, "
                             "FlinkRunner, ...); Beam options follow a bare '--'; --workers is then Beam's to choose")
    _verbose_flag(parser)


def _verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's native log lines (also: DUALENC_TF_LOG=1)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for all subcommands."""
    parser = argparse.ArgumentParser(prog="python -m tfrecords_tools", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    coco = commands.add_parser("coco", help="pack MS-COCO captions")
    coco.add_argument("--annotations", help="captions_train2014.json")
    coco.add_argument("--images", help="directory holding the images (train2014/)")
    coco.add_argument("--split", default="train", help="name of the split (default: %(default)s)")
    coco.add_argument("--holdout-images", type=int, metavar="N", help='put N random images in a "valid" split')
    coco.add_argument("--captions-per-image", type=int, metavar="N", help="keep the first N captions of each image")
    coco.add_argument("--karpathy", metavar="JSON", help="dataset_coco.json: use its train/restval, val, test splits")
    coco.add_argument("--download", nargs="?", const=str(DEFAULT_COCO_DOWNLOAD), metavar="DIR",
                      help=f"download COCO 2014 train first into DIR (default: {DEFAULT_COCO_DOWNLOAD})")
    _packer_flags(coco)
    coco.set_defaults(run=_run_coco)

    pedes = commands.add_parser("cuhk-pedes", help="pack CUHK-PEDES (reid_raw.json or caption_all.json)")
    pedes.add_argument("--annotations", required=True, help="reid_raw.json or caption_all.json")
    pedes.add_argument("--images", required=True, help="the imgs/ directory file_path is relative to")
    pedes.add_argument("--default-split", default="train",
                       help="split for files without a 'split' field, like caption_all.json (default: %(default)s)")
    _packer_flags(pedes)
    pedes.set_defaults(run=_run_cuhk_pedes)

    karpathy = commands.add_parser("karpathy", help="pack Flickr30k, Flickr8k or COCO with Karpathy's splits")
    karpathy.add_argument("--annotations", required=True,
                          help="dataset_flickr30k.json, dataset_flickr8k.json or dataset_coco.json")
    karpathy.add_argument("--images", required=True,
                          help="the directory filename (COCO: filepath/filename) is relative to: "
                               "flickr30k-images/, or the folder holding COCO's train2014/ and val2014/")
    karpathy.add_argument("--restval", default="train", choices=("train", "val", "drop"),
                          help="where COCO's restval images go (default: %(default)s, as the field trains)")
    karpathy.add_argument("--splits", default="train,val,test", metavar="LIST",
                          help="the splits to pack, comma-separated (default: %(default)s; "
                               "test alone for zero-shot scores)")
    karpathy.add_argument("--captions-per-image", type=int, metavar="N",
                          help="keep the first N sentences of each image (default: all the file lists)")
    _packer_flags(karpathy)
    karpathy.set_defaults(run=_run_karpathy)

    person_sets = {"icfg-pedes": ("ICFG-PEDES", "ICFG-PEDES.json", "file_path"),
                   "rstpreid": ("RSTPReid", "data_captions.json", "img_path")}
    for name, (title, file_name, path_field) in person_sets.items():
        person_set = commands.add_parser(name, help=f"pack {title} ({file_name}; identities as labels)")
        person_set.add_argument("--annotations", required=True, help=file_name)
        person_set.add_argument("--images", required=True, help=f"the imgs/ directory {path_field} is relative to")
        _packer_flags(person_set)
        person_set.set_defaults(run=_run_person_set)

    folder = commands.add_parser("folder", help="pack a folder of images with a CSV or JSONL caption table")
    folder.add_argument("--captions", required=True, help="FILE.csv or FILE.jsonl with image, caption[, label, split]")
    folder.add_argument("--images", required=True, help="the directory image paths are relative to")
    _packer_flags(folder)
    folder.set_defaults(run=_run_folder)

    stats = commands.add_parser("stats", help="count a packed dataset and chart it")
    stats.add_argument("data_dir", metavar="DIR")
    stats.add_argument("--out", metavar="DIR", help="where charts and stats.json go (default: DIR/stats)")
    _verbose_flag(stats)
    stats.set_defaults(run=_run_stats)

    demo = commands.add_parser("make-demo", help="generate the small synthetic CUHK-PEDES-layout demo")
    demo.add_argument("--out", required=True)
    demo.add_argument("--identities", type=int, metavar="N")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_run_make_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a user mistake prints ``error: ...`` and returns 2."""
    from dualenc.beam.options import split_beam_args

    own_args, beam_args = split_beam_args(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own_args)
    try:
        if getattr(args, "runner", None) is not None or beam_args:
            from dualenc.beam.options import check_runner_flags, pipeline_options

            check_runner_flags(getattr(args, "runner", None), beam_args)
            args.beam_options = pipeline_options(args.runner, beam_args)
        if hasattr(args, "max_side"):  # a packer
            args.store_size = _store_size(args)
        return args.run(args)
    except DualEncError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
