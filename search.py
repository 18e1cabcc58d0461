"""Search a gallery of images with a trained dual encoder: text → image, or image → image.

The gallery is embedded once with the run's exported vision encoder and kept next to the run
(``RUN/index/``); later searches only embed the query. See `python search.py --help`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dualenc.core.errors import DualEncError, first_line
from dualenc.retrieval.grid import check_grid_path
from dualenc.retrieval.query import check_query

DEFAULT_RUN = "runs/latest"  # as dualenc.api.DEFAULT_RUN, without importing it (fast --help)

EXAMPLES = """examples:
  python search.py "a woman in a red coat"                 top 9 of the run's test split
  python search.py "a dog on the beach" -k 16 --grid out.png
  python search.py "two people" --gallery ~/photos --json  any folder of images
  python search.py --image query.jpg --gallery ~/photos    image → image
  python search.py --build-index --data data/coco --split val --ann hnsw
  python search.py --evaluate                              the paper table (R@1/5/10 + RSUM, or + mAP and
                                                           mINP for person search), R@1/5/10 and mAP both
                                                           ways, top-100 accuracy (+ attribute precision@9
                                                           on the demo)
  python search.py --evaluate --model clip_vit_base_patch16 --data data/coco --split test   zero-shot CLIP
  python search.py --projector runs/latest/projector      then: tensorboard --logdir runs/latest/projector
  python search.py --serve                                 a search page at http://127.0.0.1:8000/
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="search.py",
        description="Natural-language image search with a trained dual encoder.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("query", nargs="?", help="what to look for, in words")
    parser.add_argument("-k", type=int, default=9, help="how many results (default 9)")
    parser.add_argument(
        "--model", default=DEFAULT_RUN,
        help=f"training run directory (default {DEFAULT_RUN}), or a keras-hub CLIP/SigLIP preset (handle or local "
        "directory) to search with zero-shot, exported once into runs/zero-shot/",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--gallery", type=Path, help="a folder of images to search (recursively)")
    source.add_argument("--data", type=Path, help="a packed dataset (default: the one the run trained on)")
    parser.add_argument("--split", help="split of --data to search (default: test, else val/valid, else the first)")
    parser.add_argument("--image", type=Path, help="search with this image instead of words")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--grid", type=Path, help="also draw the results into this PNG")
    parser.add_argument(
        "--ann", default="auto", choices=("auto", "exact", "hnsw", "ivf"),
        help="search method: exact, FAISS hnsw/ivf, or auto (FAISS HNSW above 50,000 images)",
    )
    parser.add_argument(
        "--engine", default="auto", choices=("auto", "tflite", "savedmodel"),
        help="what embeds images (gallery and --image): the run's vision_encoder.tflite with XNNPACK on every core, "
             "the SavedModel, or auto (TFLite when TensorFlow sees no GPU and the run has the file)",
    )
    parser.add_argument("--build-index", action="store_true", help="(re)build the gallery index; no query needed")
    parser.add_argument("--float16", action="store_true", help="store the index in half precision")
    parser.add_argument("--runner", metavar="NAME",
                        help="--build-index: embed with an Apache Beam pipeline on this runner (DirectRunner, "
                             "DataflowRunner, FlinkRunner, ...); Beam options follow a bare '--'")
    parser.add_argument("--evaluate", action="store_true", help="measure retrieval on a packed split instead of searching")
    parser.add_argument("--protocol", choices=("image-text", "person"),
                        help="--evaluate: the paper table to print: image-text (COCO/Flickr30k: R@1/5/10 both ways, "
                             "RSUM) or person (CUHK-PEDES/ICFG-PEDES/RSTPReid: text→image R@1/5/10, mAP, mINP); "
                             "default: person when images share labels, else image-text")
    parser.add_argument("--projector", type=Path, metavar="DIR",
                        help="write TensorBoard's embedding-projector files for the gallery into DIR "
                             "(view with: tensorboard --logdir DIR)")
    parser.add_argument("--serve", action="store_true", help="serve a search page and JSON API over the gallery")
    parser.add_argument("--host", default="127.0.0.1", help="--serve: address to listen on (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="--serve: port (default 8000; 0 picks a free one)")
    limits = parser.add_argument_group("--serve limits (each request is refused with a 4xx past them)")
    limits.add_argument("--max-k", type=int, default=1000, help="most results one query may ask for (default 1000)")
    limits.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image upload in MiB (default 10)")
    limits.add_argument("--max-upload-pixels", type=int, default=40_000_000,
                        help="largest decoded upload, width x height of its first frame (default 40,000,000)")
    limits.add_argument("--request-timeout", type=float, default=30.0,
                        help="seconds a request may take to upload and be answered (default 30)")
    limits.add_argument("--max-connections", type=int, default=64,
                        help="open connections served at once; beyond, requests get a 503 (default 64)")
    limits.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a connection may take to send each request head (default 10)")
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's native start-up log (also: DUALENC_TF_LOG=1)")
    parser.set_defaults(beam_args=[])  # main() fills it with what follows '--' after --runner
    return parser


def open_run(args: argparse.Namespace):
    """The `dualenc.api.Retriever` of ``--model`` with the gallery the flags name (by default
    the run's own dataset, test split) and its index opened, built by Beam with ``--runner``."""
    from dualenc.api import load
    from dualenc.retrieval.gallery import FolderGallery

    retriever = load(args.model, ann=args.ann, engine=args.engine)
    if args.gallery is not None and args.split is not None:
        raise DualEncError("--split applies to --data, not to --gallery folders")
    if args.beam_options is None:
        return retriever.index(args.gallery, data=args.data, split=args.split, rebuild=args.build_index,
                               float16=args.float16)
    from dualenc.api import default_gallery
    from dualenc.beam.index import build_index_with_beam

    gallery = FolderGallery(args.gallery) if args.gallery is not None else \
        default_gallery(retriever.run_dir, args.data, args.split)
    return retriever.use_index(gallery, build_index_with_beam(retriever.run_dir, gallery, args.beam_options,
                                                              float16=args.float16, engine=args.engine))


def search(args: argparse.Namespace, retriever) -> list[dict]:
    """The top-k results as dicts: rank, score, image_id, path, caption, label."""
    return retriever.search(args.query if args.image is None else args.image, args.k)


def print_results(results: list[dict], query_text: str) -> None:
    print(f"results for {query_text}:")
    for result in results:
        where = result["path"] or result["image_id"]
        caption = f"  \"{result['caption']}\"" if result["caption"] is not None else ""
        print(f"{result['rank']:>4}  {result['score']:.4f}  {where}{caption}")


def draw_grid(path: Path, results: list[dict], gallery, query_text: str) -> None:
    from dualenc.retrieval.grid import save_result_grid
    from dualenc.data.images import ImageProblem, decode_rgb

    blobs = gallery.read_images([result["image_id"] for result in results])
    try:
        images = [decode_rgb(blobs[result["image_id"]]) for result in results]
    except ImageProblem as problem:  # a folder image replaced since it was indexed
        raise DualEncError(f"cannot draw the --grid: {problem}; re-index the gallery with --build-index") from None
    titles = [f"{result['rank']}. {result['score']:.3f}" for result in results]
    save_result_grid(path, images, titles, query_text)


def evaluate(retriever, protocol: str | None = None) -> dict:
    """Retrieval metrics of the run on its packed split (`dualenc.api.Retriever.evaluate`), with
    the paper table of `protocol` (by default the one the split's labels show)."""
    return retriever.evaluate(protocol)


PROTOCOL_TITLES = {
    "image-text": "image-text protocol (COCO/Flickr30k: a caption's own image, any of an image's captions)",
    "person": "person protocol (CUHK-PEDES/ICFG-PEDES/RSTPReid: any image of the described person)",
}
DIRECTION_TITLES = {"text_to_image": "text→image", "image_to_text": "image→text"}


def print_paper_table(protocol: str, table: dict) -> None:
    """The table papers print for `protocol`: one column group per direction, then RSUM if any."""
    groups = [(DIRECTION_TITLES[key], table[key]) for key in DIRECTION_TITLES if key in table]
    if "RSUM" in table:
        groups.append(("", {"RSUM": table["RSUM"]}))
    print(PROTOCOL_TITLES[protocol])
    print("".join(f"{title:^{9 * len(scores)}}" for title, scores in groups).rstrip())
    print("".join(f"{name:>9}" for _, scores in groups for name in scores))
    print("".join(f"{value:>9.2f}" for _, scores in groups for value in scores.values()))


def print_evaluation(scores: dict) -> None:
    print(f"{scores['data']} split {scores['split']}: {scores['images']} images, {scores['captions']} captions")
    print_paper_table(scores["protocol"], scores["paper"])
    print("all scores (a hit is any image or caption of the same label):")
    columns = list(scores["text_to_image"])
    print(f"{'direction':<12}" + "".join(f"{name:>9}" for name in columns))
    for label, key in (("text→image", "text_to_image"), ("image→text", "image_to_text")):
        print(f"{label:<12}" + "".join(f"{scores[key][name]:>9.2f}" for name in columns))
    accuracy = scores["top_k_accuracy"]
    print(f"top-{accuracy['k']} accuracy (each image's first caption → its image): {accuracy['percent']:.2f}")
    if "attributes" in scores:
        attributes = scores["attributes"]
        print(f"attribute queries (demo): precision@{attributes['k']} {attributes['precision']:.3f}, "
              f"chance {attributes['chance']:.3f} ({attributes['queries']} queries naming 1-4 attributes, "
              f"{attributes['images']} images of unseen people)")


def run(args: argparse.Namespace) -> int:
    if args.query is not None and args.image is not None:
        raise DualEncError("pass either a QUERY or --image, not both")
    searching = args.query is not None or args.image is not None
    if args.evaluate and searching:
        raise DualEncError("--evaluate measures the whole split; drop the QUERY/--image")
    if args.serve and (searching or args.evaluate or args.json or args.grid is not None):
        raise DualEncError("--serve answers queries over HTTP; drop the QUERY/--image/--evaluate/--json/--grid")
    if not (searching or args.build_index or args.evaluate or args.serve or args.projector is not None):
        raise DualEncError("nothing to do: give a QUERY, --image FILE, --build-index, --evaluate, --projector DIR "
                           "or --serve (see --help)")
    if args.protocol is not None and not args.evaluate:
        raise DualEncError(f"--protocol {args.protocol} chooses the --evaluate table; add --evaluate")
    if args.projector is not None:
        from dualenc.retrieval.projector import check_projector_directory

        check_projector_directory(args.projector)
    if args.query is not None:
        args.query = check_query(args.query)
    if args.evaluate and args.gallery is not None:
        raise DualEncError("--evaluate needs captions: pass a packed dataset with --data DIR [--split NAME], not --gallery")
    if args.k < 1:
        raise DualEncError(f"-k must be at least 1, got {args.k}")
    for flag in ("max_k", "max_upload_mb", "max_upload_pixels", "request_timeout", "max_connections", "header_timeout"):
        if not getattr(args, flag) > 0:
            raise DualEncError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.grid is not None:
        check_grid_path(args.grid)
    if args.runner is not None and not args.build_index:
        raise DualEncError("--runner builds the index with Apache Beam; add --build-index")
    args.beam_options = None
    if args.runner is not None:
        from dualenc.beam.options import pipeline_options

        args.beam_options = pipeline_options(args.runner, args.beam_args)

    from dualenc.core.startup import import_tensorflow

    import_tensorflow(args.verbose)
    retriever = open_run(args)
    index = retriever.gallery_index
    if args.build_index:
        kind = retriever.search_kind
        if kind not in ("exact", "compressed"):
            index.ann_index(kind)
        print(f"indexed {len(index)} images ({index.embedded} embedded now) in {index.directory}; search: {kind}", file=sys.stderr)
    if args.projector is not None:
        config = retriever.projector(args.projector)
        print(f"wrote the embedding projector of {len(index)} images to {config.parent}; "
              f"view: tensorboard --logdir {config.parent}", file=sys.stderr)
    if args.evaluate:
        scores = evaluate(retriever, args.protocol)
        if args.json:
            print(json.dumps(scores, indent=2))
        else:
            print_evaluation(scores)
    if searching:
        results = search(args, retriever)
        query_text = f'"{args.query}"' if args.image is None else f"image {args.image}"
        if args.json:
            print(json.dumps(results, indent=2, ensure_ascii=False))
        else:
            print_results(results, query_text)
        if args.grid is not None:
            draw_grid(args.grid, results, retriever.gallery, query_text)
    if args.serve:
        serve(retriever, args)
    return 0


def serve(retriever, args: argparse.Namespace) -> None:
    """`dualenc.service.server.serve` over the retriever's gallery and index with the limits the
    flags set, or a `DualEncError` naming the extra it needs."""
    try:
        from dualenc.service.inputs import ServiceLimits
        from dualenc.service.server import serve as serve_forever
    except ImportError as exc:
        raise DualEncError(f"--serve needs FastAPI and uvicorn ({first_line(exc)}); pip install 'dualenc[serve]'") from None
    limits = ServiceLimits(max_k=args.max_k, max_upload_bytes=int(args.max_upload_mb * 2**20),
                           max_upload_pixels=args.max_upload_pixels, request_timeout_s=args.request_timeout,
                           header_timeout_s=args.header_timeout, max_connections=args.max_connections)
    serve_forever(retriever.run_dir, retriever.gallery, index=retriever.gallery_index, ann=retriever.ann,
                  engine=retriever.engine, host=args.host, port=args.port, limits=limits)


def main(argv: list[str] | None = None) -> int:
    from dualenc.beam.options import has_runner_flag, split_beam_args

    argv = sys.argv[1:] if argv is None else list(argv)
    own_args, beam_args = split_beam_args(argv) if has_runner_flag(argv) else (argv, [])
    args = build_parser().parse_args(own_args)
    args.beam_args = beam_args
    try:
        return run(args)
    except DualEncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
