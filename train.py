"""Train a dual encoder and export its two towers for search.

    python train.py                                  # the embedded demo (10 epochs), built on first use
    python train.py --preset coco --data data/coco   # seed 003: frozen Xception + small BERT
    python train.py --preset cuhk-pedes --data data/cuhk --placement split
    python -m dualenc.launch --workers 2 -- train.py --data data/cuhk --out runs/two --placement multi-worker

Flags override the preset, and a --config JSON file sits between the two. Everything lands in
--out (default runs/<timestamp>, with runs/latest pointing at it once training starts); the same
command again resumes an interrupted run. One process at a time trains into a run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from dualenc.core import config as configs
from dualenc.core import runs
from dualenc.distribute.cluster import training_cluster
from dualenc.core.errors import DualEncError, first_line
from dualenc.core.files import is_out_of_space
from dualenc.training.presets import PRESETS, preset

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
    parser.add_argument("--vision-preset", help="keras-hub preset (handle or local dir) for --vision clip|siglip")
    parser.add_argument("--text-preset",
                        help="keras-hub preset (handle or local dir) for --text clip|siglip|bert (bert without it: TF Hub)")
    parser.add_argument("--projection", choices=configs.PROJECTIONS,
                        help="heads: dualenc's heads on pooled features; preset: keep the CLIP/SigLIP projection")
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
    parser.add_argument("--schedule", choices=configs.SCHEDULES,
                        help="learning rate within the run: constant (cut on plateaus) or cosine (to 0 at the last step)")
    parser.add_argument("--warmup-epochs", type=float, help="linear warm-up over this many epochs (may be fractional)")
    parser.add_argument("--warmup-from", type=float, help="the warm-up's first rate, as a fraction of the learning rate")
    parser.add_argument("--head-lr-multiplier", type=float,
                        help="heads, temperature and classifier learn at this multiple of the towers' rate")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="training images mirrored left-right at random (off by itself when captions name sides)")
    parser.add_argument("--translate", type=float, help="training images shifted by up to this fraction of their size")
    parser.add_argument("--erase", type=float, help="probability of random erasing of a training image")
    parser.add_argument("--token-dropout", type=float, help="probability of dropping each training caption token (bilstm)")
    parser.add_argument("--out", help="run directory (default: runs/<timestamp>, linked from runs/latest)")
    parser.add_argument("--no-feature-cache", action="store_true",
                        help="run frozen backbones every epoch instead of caching their features")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's native start-up log (also: DUALENC_TF_LOG=1)")
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
        override = configs.read_json(args.config, "--config")
        if not isinstance(override, dict):
            raise DualEncError(f"--config {args.config} must hold a JSON object of TrainConfig fields")
        values = _merge(values, override)
    config = configs.from_dict(configs.TrainConfig, values, args.config or "preset")
    model, vision, text = config.model, config.model.vision, config.model.text
    if args.vision:
        vision = configs.VisionConfig(args.vision, weights=vision.weights, trainable=vision.trainable, preset=args.vision_preset)
    elif args.vision_preset:
        vision = dataclasses.replace(vision, preset=args.vision_preset)
    if args.vision_weights:
        vision = dataclasses.replace(vision, weights=None if args.vision_weights.lower() == "none" else args.vision_weights)
    if args.text:
        text = dataclasses.replace(text, tower=args.text, preset=args.text_preset)
    elif args.text_preset:
        text = dataclasses.replace(text, preset=args.text_preset)
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
    if args.projection:
        model_changes["projection"] = args.projection
    if args.temperature is not None:
        model_changes["temperature"] = args.temperature
    elif args.loss == "siglip":
        # SigLIP learns its temperature from the paper's starting point.
        model_changes.update(temperature=configs.SIGLIP_TEMPERATURE, learn_temperature=True)
    if "cmpc" in model_changes.get("loss", model.loss):
        model_changes.setdefault("num_classes", max(model.num_classes, 1))
    augment_changes = {field: getattr(args, field) for field in ("flip", "translate", "erase", "token_dropout")
                       if getattr(args, field) is not None}
    changes = {"model": dataclasses.replace(model, **model_changes),
               "augment": dataclasses.replace(config.augment, **augment_changes)}
    for field in ("epochs", "batch_size", "learning_rate", "placement", "mixed_precision", "seed", "monitor", "data",
                  "schedule", "warmup_epochs", "warmup_from", "head_lr_multiplier"):
        if getattr(args, field) is not None:
            changes[field] = getattr(args, field)
    return dataclasses.replace(config, **changes)


def check_before_tensorflow(args: argparse.Namespace) -> configs.TrainConfig:
    """The config, after every check that needs no TensorFlow: flags and --config, the weights
    file, where the run will be written and the dataset's manifest."""
    config = build_config(args)
    configs.check_weights_file(config.model.vision)
    training_cluster(config.placement, args.out, config.data)  # TF_CONFIG and the shared directories
    if args.out is not None:
        runs.check_out(args.out)
    else:
        runs.check_writable(RUNS_ROOT, "runs folder")
    if config.data is not None:
        from dualenc.data.manifest import load_manifest

        config = dataclasses.replace(config, data=str(Path(config.data).resolve()))
        load_manifest(config.data)
    elif args.preset != "demo":
        raise DualEncError(f"--preset {args.preset} needs --data DIR (a directory packed with `python -m tfrecords_tools`)")
    return config


def train(args: argparse.Namespace, config: configs.TrainConfig) -> tuple[runs.RunPaths, dict]:
    """Claim the run directory and train into it; runs/latest moves only once training starts."""
    from dualenc.core.startup import import_tensorflow

    cluster = training_cluster(config.placement, args.out, config.data)
    # A multi-worker strategy must start TensorFlow's runtime itself (run_training creates it).
    import_tensorflow(args.verbose, create_devices=cluster is None)
    from dualenc.data.manifest import load_manifest
    from dualenc.models.towers.keras_hub import resolve_model_config
    from dualenc.training.loop import resolve_config, run_training

    # Image size, sequence length and projection width of keras-hub presets.
    config = dataclasses.replace(config, model=resolve_model_config(config.model))
    built_in_demo = config.data is None
    if built_in_demo:
        from tfrecords_tools.demo_cache import packed_demo

        config = dataclasses.replace(config, data=str(packed_demo()))
    manifest = load_manifest(config.data)

    def resolved(candidate: runs.RunPaths) -> configs.TrainConfig:
        return resolve_config(config, manifest, candidate)

    if cluster is not None and not cluster.is_chief:
        # Only the chief claims and writes the run directory; this worker follows its backup.
        paths = runs.RunPaths(Path(args.out).resolve())
        return paths, run_training(resolved(paths), paths, resume=paths.backup.is_dir(),
                                   use_feature_cache=not args.no_feature_cache, verbose=0 if args.quiet else 1)
    paths, _ = runs.choose_run_dir(args.out, RUNS_ROOT, resolved)
    with runs.claim_run_dir(paths.root) as claim:
        # Decided again under the lock: another process may have used the directory meanwhile.
        paths, resume = runs.choose_run_dir(paths.root, RUNS_ROOT, resolved)

        def started() -> None:
            claim.started()
            if args.out is None:
                point_latest_run(paths)
            print(f"{'resuming' if resume else 'training'} into {paths.root}", flush=True)

        report = run_training(resolved(paths), paths, resume=resume, use_feature_cache=not args.no_feature_cache,
                              verbose=0 if args.quiet else 1, on_start=started)
        if built_in_demo:
            report = _with_attribute_scores(report, paths, Path(config.data))
    return paths, report


def point_latest_run(paths: runs.RunPaths) -> None:
    """runs/latest → `paths`: called when training starts, so the same command finds an
    interrupted run again, and a start that fails leaves the link where it was."""
    RUNS_ROOT.mkdir(exist_ok=True)
    runs.point_latest(RUNS_ROOT, paths)


def _with_attribute_scores(report: dict, paths: runs.RunPaths, data_dir: Path) -> dict:
    """Add attribute-query precision@9 (`dualenc.retrieval.attributes`) and the captions' R@1
    ceiling (`dualenc.retrieval.ceiling`) to the report and metrics.json.

    Only for the built-in demo (no --data): `search.py --evaluate` scores any other demo pack.
    """
    from dualenc.retrieval.attributes import run_attribute_report
    from dualenc.retrieval.ceiling import demo_pack_ceiling
    from dualenc.core.files import write_json_atomic

    scores = run_attribute_report(paths.root, data_dir)
    if scores is None:
        return report
    report = {**report, "attributes": scores, "t2i_r1_ceiling": demo_pack_ceiling(data_dir, report["split"])}
    write_json_atomic(paths.metrics, report)
    return report


def score_summary(report: dict) -> str:
    """The paper table of the report's protocol in one line, labelled as the per-epoch lines are
    ("person protocol: t2i R@1 …, t2i mINP …" or "image-text protocol: t2i R@1 …, i2t R@10 …, RSUM …")."""
    table = report["paper"]
    directions = [(label, key) for label, key in (("t2i", "text_to_image"), ("i2t", "image_to_text")) if key in table]
    scores = [f"{label} {name} {value:.1f}" for label, key in directions for name, value in table[key].items()]
    if "RSUM" in table:
        scores.append(f"RSUM {table['RSUM']:.1f}")
    return f"{report['protocol']} protocol: " + ", ".join(scores)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths, report = train(args, check_before_tensorflow(args))
    except DualEncError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a full disk, met by any writer (checkpoint, backup, log, export)
        if not is_out_of_space(error):
            raise
        print(f"error: the disk is full ({first_line(error)}); free space, then rerun the same command: "
              "the run resumes from its last backup", file=sys.stderr)
        return 2
    print(f"done: {paths.root} ({report['split']} split: {score_summary(report)})")
    if "attributes" in report:
        scores = report["attributes"]
        print(f"attribute queries: precision@{scores['k']} {scores['precision']:.2f} (chance {scores['chance']:.2f}; "
              f"{scores['queries']} queries, {scores['images']} images of unseen people)")
        print(f"identity ceiling: a model that reads every named attribute perfectly expects t2i R@1 "
              f"{report['t2i_r1_ceiling']:.1f} on these captions (each names only some attributes, and several people fit it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
