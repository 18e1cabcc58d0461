"""Train a dual encoder and export its two towers for search.

    python train.py --epochs 30                      # the embedded demo, built on first use
    python train.py --preset coco --data data/coco   # seed 003: frozen Xception + small BERT
    python train.py --preset cuhk-pedes --data data/cuhk --placement split
    python -m dualenc.launch --workers 2 -- train.py --data data/cuhk --out runs/two --placement multi-worker

Flags override the preset, and a --config JSON file sits between the two. Everything lands in
--out (default runs/<timestamp>, with runs/latest pointing at it); the same command again
resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from dualenc import config as configs
from dualenc.cluster import training_cluster
from dualenc.errors import DualEncError
from dualenc.presets import PRESETS, preset

RUNS_ROOT = Path("runs")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", help="packed TFRecord directory (with manifest.json); default: the demo dataset")
    parser.add_argument("--preset", default="demo", choices=list(PRESETS), help="starting configuration (default: demo)")
    parser.add_argument("--config", help="JSON file of TrainConfig fields applied over the preset")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--loss", choices=configs.LOSSES)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--vision", choices=configs.VISION_BACKBONES, help="vision backbone")
    parser.add_argument("--vision-weights", help='"imagenet", "none" or a local weights file')
    parser.add_argument("--text", choices=configs.TEXT_TOWERS, help="text tower")
    parser.add_argument("--text-preprocessor", help="TF Hub handle or local SavedModel dir of the BERT preprocessor")
    parser.add_argument("--text-encoder", help="TF Hub handle or local SavedModel dir of the BERT encoder")
    parser.add_argument("--train-backbones", action=argparse.BooleanOptionalAction, default=None,
                        help="fine-tune (or, with --no-train-backbones, freeze) both backbones")
    parser.add_argument("--placement", choices=configs.PLACEMENTS,
                        help="multi-worker: one of several machines (TF_CONFIG); auto: multi-worker when TF_CONFIG names several")
    parser.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--monitor", choices=configs.MONITORS,
                        help="what LR reduction, early stopping and the best checkpoint follow")
    parser.add_argument("--out", help="run directory (default: runs/<timestamp>, linked from runs/latest)")
    parser.add_argument("--no-feature-cache", action="store_true",
                        help="run frozen backbones every epoch instead of caching their features")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return parser.parse_args(argv)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def build_config(args: argparse.Namespace) -> configs.TrainConfig:
    """Preset, then --config file, then flags."""
    values = configs.to_dict(preset(args.preset))
    if args.config:
        try:
            override = json.loads(Path(args.config).read_text())
        except FileNotFoundError:
            raise DualEncError(f"--config {args.config} does not exist") from None
        except json.JSONDecodeError as exc:
            raise DualEncError(f"--config {args.config} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(override, dict):
            raise DualEncError(f"--config {args.config} must hold a JSON object of TrainConfig fields")
        values = _merge(values, override)
    config = configs.from_dict(configs.TrainConfig, values, args.config or "preset")
    model, vision, text = config.model, config.model.vision, config.model.text
    if args.vision:
        vision = configs.VisionConfig(args.vision, weights=vision.weights, trainable=vision.trainable)
    if args.vision_weights:
        vision = dataclasses.replace(vision, weights=None if args.vision_weights.lower() == "none" else args.vision_weights)
    if args.text:
        text = dataclasses.replace(text, tower=args.text)
    if args.text_preprocessor:
        text = dataclasses.replace(text, preprocessor=args.text_preprocessor)
    if args.text_encoder:
        text = dataclasses.replace(text, encoder=args.text_encoder)
    if args.train_backbones is not None:
        vision = dataclasses.replace(vision, trainable=args.train_backbones)
        text = dataclasses.replace(text, trainable=args.train_backbones)
    model_changes = {"vision": vision, "text": text}
    if args.loss:
        model_changes["loss"] = args.loss
    if args.temperature is not None:
        model_changes["temperature"] = args.temperature
    if "cmpc" in model_changes.get("loss", model.loss):
        model_changes.setdefault("num_classes", max(model.num_classes, 1))
    changes = {"model": dataclasses.replace(model, **model_changes)}
    for field in ("epochs", "batch_size", "learning_rate", "placement", "mixed_precision", "seed", "monitor", "data"):
        if getattr(args, field) is not None:
            changes[field] = getattr(args, field)
    return dataclasses.replace(config, **changes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
        cluster = training_cluster(config.placement, args.out, config.data)  # TF_CONFIG checked before TensorFlow starts
        from dualenc.training import resolve_config, run_training  # heavy: TensorFlow
        from dualenc.manifest import load_manifest
        from dualenc.runs import RunPaths, choose_run_dir, point_latest

        if config.data is None:
            if args.preset != "demo":
                raise DualEncError(f"--preset {args.preset} needs --data DIR (a directory packed with `python -m tfrecords_tools`)")
            from tfrecords_tools.demo_cache import packed_demo

            config = dataclasses.replace(config, data=str(packed_demo()))
        config = dataclasses.replace(config, data=str(Path(config.data).resolve()))
        manifest = load_manifest(config.data)
        if cluster is not None and not cluster.is_chief:
            # Only the chief checks and writes the run directory; this worker follows its backup.
            paths, resume = RunPaths(Path(args.out).resolve()), False
        else:
            paths, resume = choose_run_dir(args.out, RUNS_ROOT, lambda candidate: resolve_config(config, manifest, candidate))
        config = resolve_config(config, manifest, paths)

        def started() -> None:
            if args.out is None:
                # Pointed at before training, so the same command finds an interrupted run again,
                # but only once the data and model are known good, so a failed start leaves it be.
                RUNS_ROOT.mkdir(exist_ok=True)
                point_latest(RUNS_ROOT, paths)
            print(f"{'resuming' if resume else 'training'} into {paths.root}", flush=True)

        report = run_training(config, paths, resume=resume, use_feature_cache=not args.no_feature_cache,
                              verbose=0 if args.quiet else 1, on_start=started)
    except DualEncError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{key} {value:.1f}" for key, value in report.items() if isinstance(value, float))
    print(f"done: {paths.root} ({report['split']} split: {summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
