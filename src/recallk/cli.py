"""The ``recallk`` command line: ``train``, ``evaluate``, ``embed``, ``search``, ``export``, ``recipes``, ``config``
and ``demo``.

Each subcommand imports its implementation only when it runs, so ``recallk --help`` answers at once.

Exit status: 0 on success; 2 for problems the user can fix (a bad argument, config, path or data set, an untrusted
checkpoint, a full disk: :class:`~recallk.errors.RecallkUsageError`, ``ValueError``, ``FileNotFoundError`` and other
missing-path errors), printed as one line ``recallk: error: ...`` without a traceback; 1 for any other failure (one
line, plus the traceback with ``--debug``); 130 when interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from recallk import __version__
from recallk.errors import RecallkUsageError, TrainingDiverged, TrainingInterrupted
from recallk.files import OutputWriteError, atomic_write_text, write_json
from recallk.registry import BENCHMARKS

if TYPE_CHECKING:
    from recallk.config import Config

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left

# Exceptions whose message tells the user what to fix: printed as one line, exit status 2.
USAGE_ERRORS: tuple[type[BaseException], ...] = (
    RecallkUsageError,
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)

DEVICES = ("auto", "cpu", "cuda")

# The option that makes each command write its output elsewhere: named when a write fails (read-only, disk full).
WRITE_OPTIONS = {
    "train": "--run-dir DIR", "evaluate": "--out FILE", "embed": "--out FILE", "search": "--out FILE",
    "export": "--out PATH", "recipes": "--copy NAME DIR", "demo": "--run-dir DIR",
}

MAIN_EPILOG = """\
examples:
  recallk demo                                     # small end-to-end run on Omniglot
  recallk recipes                                  # the bundled recipes
  recallk train omniglot                           # train a bundled recipe (or a YAML file of your own)
  recallk train sop_resnet50 --data-dir /data optim.lr=1e-5
  recallk evaluate runs/omniglot                   # recall@k table of a finished run
  recallk embed runs/omniglot --split test --out test.npz
  recallk search runs/omniglot --gallery photos/ --query q.png
  recallk export runs/omniglot --format onnx --out model.onnx
  recallk whiten runs/sfm --pairs val              # learn a whitening, stored with the model
  recallk config --explain data                    # every config key with its type, default and meaning

'recallk COMMAND --help' shows each command's options.
"""

TRAIN_EPILOG = """\
overrides:
  Any config key can be set after CONFIG as dotted.key=value; values are read as YAML
  (numbers, true/false, null, [lists]). Command-line options win over overrides.

CONFIG is a bundled recipe name ('recallk recipes' lists them) or a YAML file; 'recallk config --explain'
describes every key.

examples:
  recallk train omniglot
  recallk train sop_resnet50 --data-dir /data/sop optim.lr=1e-5 data.batch_size=2000
  recallk train cub_resnet50 model.pretrained=false train.max_steps=5 --device cpu
  recallk train my_recipe.yaml --run-dir runs/omni
  recallk train --resume runs/omni train.epochs=20                  # continue (and extend) that run
  recallk train omniglot loss.simix=true --dry-run                 # print the resolved config only
"""

EVALUATE_EPILOG = """\
examples:
  recallk evaluate runs/omniglot                   # every test split of the run's config
  recallk evaluate runs/sop/checkpoints/last.pt --split test --data-dir /data
  recallk evaluate runs/omniglot --out results/omniglot.json
  recallk evaluate runs/sfm --benchmark roxford5k --data-dir /data          # <data>/roxford5k/gnd_roxford5k.pkl
  recallk evaluate runs/sfm --benchmark rparis6k --scales 1 0.7071 0.5 --distractors /data/revisitop1m/list.txt

The table is printed and saved as JSON (plus a .txt copy), by default in the run directory; splits and
benchmarks evaluated earlier into the same file are kept: one entry per split, and per benchmark and settings
(distractors, checkpoint, image size, scales, whitening), e.g. 'roxford5k (best.pt, 1024 px, scales 1,
whitening none)'. Benchmarks report mAP and mP@1/5/10 of the Easy, Medium and Hard protocols (percentages in the
table, fractions in the JSON). --scales also takes cirtorch's spelling '[1, 1/2**(1/2), 1/2]'.
"""

EMBED_EPILOG = """\
examples:
  recallk embed runs/omniglot --split test --out omniglot_test.npz
  recallk embed runs/sop/checkpoints/best.pt --data sop --data-dir /data --split test --out sop_test.npz
  recallk embed runs/omniglot --images photos/ extra.png --out photos.npz     # unlabelled image files
  recallk embed runs/clinc --texts sentences.txt --out sentences.npz        # one sentence per line

The file holds the embeddings (N x D, unit norm) and the item ids (file paths or sentences), plus the integer
labels and the class names (class_names[labels[i]]) when a labelled split is embedded.
"""

SEARCH_EPILOG = """\
examples:
  recallk search runs/omniglot --gallery gallery/ --query q1.png q2.png
  recallk search model_folder/ --gallery gallery/ --query queries/ --top-k 10 --out results.json
  recallk search /readonly/run --gallery gallery/ --query q.png --cache ~/.cache/gallery   # or --no-cache

The gallery is embedded once and cached in <run>/search_cache, or in --cache DIR (rebuilt when a gallery file
or the model changes). Results are printed, written as JSON (default search_results.json) and drawn, one picture per
query next to the JSON file. The search is exact (faiss when installed, else chunked torch).
"""

EXPORT_EPILOG = """\
examples:
  recallk export runs/omniglot --format torchscript --out model.pt    # torch.jit.load(...)(images)
  recallk export runs/omniglot --format onnx --out model.onnx         # pip install 'recallk[onnx]'
  recallk export runs/omniglot --format pretrained --out omniglot-rsk  # model.safetensors + config.json + card
  recallk export runs/omniglot --format pretrained --out omniglot-rsk --overwrite   # replace that saved model

TorchScript and ONNX take preprocessed images (B, C, H, W) with any batch size B and return unit-norm
embeddings (B, D); the exported model is checked against the eager one on a random batch. They hold the network
at one scale (its whitening included): a landmark model's description at several eval.scales ('recallk embed',
the benchmarks) is not part of the exported graph. 'pretrained' writes the Hugging Face Hub layout that
recallk.load_model reads, without paths of this machine; it refuses a folder that already holds a saved model
(unless --overwrite) or other README.md/config.json files.
"""

WHITEN_EPILOG = """\
examples:
  recallk whiten runs/sfm120k --pairs val                  # learned whitening from SfM-120k's val pairs
  recallk whiten runs/sfm120k --pairs whiten --dim 256     # cirtorch's whitening pairs, reduced to 256-d
  recallk whiten runs/gldv2 --images /data/sample/ --power 0.25    # PCA whitening (0.5: full)

The whitened model is saved as checkpoints/whitened.pt beside the checkpoint used (never over an existing file
without --force); 'recallk evaluate', 'embed', 'search', 'export' and recallk.load_model on the run then use it.
"""

RECIPES_EPILOG = """\
examples:
  recallk recipes                                  # list the bundled recipes
  recallk recipes --copy omniglot my_configs/      # write my_configs/omniglot.yaml to edit
  recallk train omniglot                           # train a bundled recipe by name
"""

CONFIG_EPILOG = """\
examples:
  recallk config --explain                         # every section
  recallk config --explain optim                   # one section
  recallk config --explain train.ema_decay         # one key
"""

DEMO_EPILOG = """\
examples:
  recallk demo                                     # data from $RECALLK_DATA or the user cache
  recallk demo --data-dir ../shared/data --run-dir runs/demo
"""


class _ArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line: ``recallk: error: <what>; see '<prog> --help'``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"recallk: error: {message}; see '{self.prog} --help'\n")


def _add_subcommand(
    subparsers: argparse._SubParsersAction, name: str, summary: str, epilog: str, handler: Callable[..., int]
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logging")
    parser.set_defaults(handler=handler)
    return parser


def _add_progress_switches(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--quiet``; without either, bars are drawn only on a terminal (never into a log file)."""
    switches = parser.add_mutually_exclusive_group()
    switches.add_argument("--progress", action="store_true", default=None,
                          help="draw progress bars even when the output is not a terminal")
    switches.add_argument("--quiet", action="store_true",
                          help="no progress bars, and only warnings and errors on the console")


def _add_scales_switch(parser: argparse.ArgumentParser, scope: str = "") -> None:
    """``--scales``, read by :func:`_scales`; ``scope`` opens its help (e.g. which option it goes with)."""
    parser.add_argument("--scales", metavar="S", nargs="+",
                        help=f"{scope}descriptor scales, e.g. 1 0.7071 0.5 or cirtorch's '[1, 1/2**(1/2), 1/2]' "
                             "(default: eval.scales)")


def _progress(args: argparse.Namespace) -> bool:
    from recallk.training.console import show_progress

    return show_progress(False if args.quiet else args.progress)


def build_parser() -> argparse.ArgumentParser:
    """The full ``recallk`` argument parser."""
    parser = _ArgumentParser(
        prog="recallk",
        description="Deep metric learning by directly optimising recall@k (RS@k loss, large batches, SiMix).",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("--version", action="version", version=f"recallk {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)

    train = _add_subcommand(subparsers, "train", "train a model from a YAML config", TRAIN_EPILOG, _cmd_train)
    train.add_argument("config", metavar="CONFIG", nargs="?",
                       help="bundled recipe name (e.g. omniglot; see 'recallk recipes') or YAML config file "
                       "(default with --resume: the run's config)")
    train.add_argument(
        "overrides", metavar="KEY=VALUE", nargs="*", default=[], help="config overrides, e.g. optim.lr=1e-5"
    )
    train.add_argument("--data-dir", metavar="DIR", help="data root (sets data.data_dir)")
    train.add_argument("--run-dir", metavar="DIR", help="output directory of this run (sets output.run_dir)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt")
    train.add_argument("--device", choices=DEVICES, help="where to train (sets train.device)")
    train.add_argument("--dry-run", action="store_true",
                       help="check the config (data directory, dataset, transform, reader options, loss parameters, "
                            "model/transform channels, resume changes, the training split's classes against the "
                            "batch, chunking against BatchNorm), print it as YAML and exit")
    _add_progress_switches(train)

    evaluate = _add_subcommand(
        subparsers, "evaluate", "compute retrieval metrics of a trained model", EVALUATE_EPILOG, _cmd_evaluate
    )
    evaluate.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory or a checkpoint file")
    evaluate.add_argument("--split", help="split to evaluate (default: the config's data.split_test)")
    evaluate.add_argument("--data-dir", metavar="DIR", help="data root (default: the run's data.data_dir)")
    evaluate.add_argument("--device", choices=DEVICES, default="auto", help="where to compute (default: auto)")
    evaluate.add_argument("--out", metavar="FILE", help="metrics JSON file (default: evaluation.json in the run)")
    evaluate.add_argument("--benchmark", choices=list(BENCHMARKS),
                          help="a landmark benchmark under the data root instead of the run's splits")
    evaluate.add_argument("--distractors", metavar="LIST",
                          help="with --benchmark: a file of extra database images (R1M), one path a line")
    _add_scales_switch(evaluate, "with --benchmark: ")
    evaluate.add_argument("--skip-bad-images", action="store_true",
                          help="with --benchmark: leave out images that cannot be read (checked before any "
                               "descriptor, reported in one warning)")
    _add_progress_switches(evaluate)

    embed = _add_subcommand(
        subparsers, "embed", "export embeddings of a data split, image files or text lines", EMBED_EPILOG, _cmd_embed
    )
    embed.add_argument("checkpoint", metavar="MODEL", help="a run directory, checkpoint file or saved model folder")
    embed.add_argument("--images", metavar="PATH", nargs="+", help="unlabelled image files or folders to embed")
    embed.add_argument("--texts", metavar="FILE", help="text file to embed, one sentence per line (text models)")
    embed.add_argument("--data", metavar="DATASET", help="dataset name (default: the one the model was trained on)")
    embed.add_argument("--split", help="split to embed (default: the run's first test split, data.split_test)")
    embed.add_argument("--out", metavar="FILE", required=True, help="output .npz file")
    embed.add_argument("--data-dir", metavar="DIR", help="data root (default: the run's data.data_dir)")
    embed.add_argument("--device", choices=DEVICES, default="auto", help="where to compute (default: auto)")
    embed.add_argument("--batch-size", type=int, metavar="N", help="images or sentences per forward pass")
    embed.add_argument("--skip-bad-images", action="store_true",
                       help="--images: leave out files that cannot be decoded (reported in one warning)")
    embed.add_argument("--max-image-pixels", type=int, metavar="N",
                       help="--images: Pillow's decompression-bomb limit in pixels (default 89,478,485)")
    _add_progress_switches(embed)

    search = _add_subcommand(
        subparsers, "search", "find the gallery images most similar to query images", SEARCH_EPILOG, _cmd_search
    )
    search.add_argument("model", metavar="MODEL", help="a run directory, checkpoint file or saved model folder")
    search.add_argument("--gallery", metavar="PATH", nargs="+", required=True, help="gallery image folders or files")
    search.add_argument("--query", metavar="PATH", nargs="+", required=True, help="query image files or folders")
    search.add_argument("--top-k", type=int, default=5, metavar="K", help="neighbours per query (default: 5)")
    search.add_argument("--out", metavar="FILE", default="search_results.json",
                        help="results JSON (default: search_results.json); pictures are written next to it")
    search.add_argument("--device", choices=DEVICES, default="auto", help="where to compute (default: auto)")
    search.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per forward pass")
    cache = search.add_mutually_exclusive_group()
    cache.add_argument("--cache", metavar="DIR", help="folder for the gallery cache (default: <MODEL>/search_cache)")
    cache.add_argument("--no-cache", action="store_true", help="embed the gallery without reading or writing a cache")
    search.add_argument("--skip-bad-images", action="store_true",
                        help="leave out gallery and query files that cannot be decoded (reported in one warning)")
    search.add_argument("--max-image-pixels", type=int, metavar="N",
                        help="Pillow's decompression-bomb limit in pixels (default 89,478,485)")
    _add_progress_switches(search)

    export = _add_subcommand(
        subparsers, "export", "export a trained model to TorchScript, ONNX or a shareable folder", EXPORT_EPILOG,
        _cmd_export,
    )
    export.add_argument("model", metavar="MODEL", help="a run directory, checkpoint file or saved model folder")
    export.add_argument("--format", required=True, choices=("torchscript", "onnx", "pretrained"),
                        help="torchscript (.pt), onnx (.onnx) or pretrained (a Hugging Face Hub folder)")
    export.add_argument("--out", metavar="PATH", required=True, help="output file (folder for pretrained)")
    export.add_argument("--overwrite", action="store_true",
                        help="pretrained: replace the saved model already in the --out folder")

    whiten = _add_subcommand(
        subparsers, "whiten", "learn a descriptor whitening for a trained model and store it with the model",
        WHITEN_EPILOG, _cmd_whiten,
    )
    whiten.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory or a checkpoint file")
    source = whiten.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", metavar="PART",
                        help="learned whitening from the matching pairs of this part of the run's data set "
                             "(sfm120k: val, train or whiten)")
    source.add_argument("--images", metavar="PATH", nargs="+", help="PCA whitening from these image files or folders")
    whiten.add_argument("--dim", type=int, metavar="D", help="output dimensions (default: the embedding size)")
    whiten.add_argument("--power", type=float,
                        help="PCA eigenvalue power: 0.5 whitens fully, 0.25 as deep-image-retrieval (default: 0.5)")
    whiten.add_argument("--out", metavar="FILE", help="whitened checkpoint (default: checkpoints/whitened.pt)")
    whiten.add_argument("--force", action="store_true", help="replace an existing whitened checkpoint")
    whiten.add_argument("--data-dir", metavar="DIR", help="data root (default: the run's data.data_dir)")
    whiten.add_argument("--device", choices=DEVICES, default="auto", help="where to compute (default: auto)")
    _add_scales_switch(whiten)
    whiten.add_argument("--skip-bad-images", action="store_true",
                        help="leave out images that cannot be read (and the pairs using them), checked before any "
                             "descriptor")
    _add_progress_switches(whiten)

    recipes = _add_subcommand(subparsers, "recipes", "list or copy the bundled recipes", RECIPES_EPILOG, _cmd_recipes)
    recipes.add_argument("--copy", nargs=2, metavar=("NAME", "DIR"), help="write recipe NAME into folder DIR")

    config = _add_subcommand(
        subparsers, "config", "describe the configuration keys", CONFIG_EPILOG, _cmd_config
    )
    config.add_argument("--explain", metavar="SECTION_OR_KEY", nargs="?", const="", required=True,
                        help="print every key (of SECTION: data, model, loss, ...; or one KEY, e.g. "
                             "train.ema_decay) with type, default and meaning")

    demo = _add_subcommand(
        subparsers, "demo", "train and evaluate a small model on Omniglot in minutes", DEMO_EPILOG, _cmd_demo
    )
    demo.add_argument("--data-dir", metavar="DIR", help="data root holding omniglot/ (default: $RECALLK_DATA)")
    demo.add_argument("--run-dir", metavar="DIR", default="runs/demo", help="output directory (default: runs/demo)")
    demo.add_argument("--device", choices=DEVICES, default="auto", help="where to train (default: auto)")
    _add_progress_switches(demo)

    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Subcommands


def _cmd_train(args: argparse.Namespace) -> int:
    from recallk.config import config_to_yaml, load_config
    from recallk.recipes import is_recipe_name, recipe_path

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path and not Path(config_path).exists():
        config_path, overrides = None, [config_path, *overrides]  # `train --resume DIR key=value`
    run_dir = args.run_dir
    if args.resume is not None:
        resume_dir = Path(args.resume)
        if not resume_dir.is_dir():
            raise RecallkUsageError(
                f"--resume {args.resume} is not a run directory; pass the directory of the run to continue "
                "(the one holding checkpoints/last.pt)"
            )
        if run_dir is not None and Path(run_dir) != resume_dir:
            raise RecallkUsageError(
                f"--run-dir {run_dir} and --resume {args.resume} name different directories; drop --run-dir"
            )
        run_dir = str(resume_dir)
        config_path = config_path or resume_dir / "config.yaml"
    elif config_path is None:
        raise RecallkUsageError(
            "recallk train needs CONFIG (a bundled recipe name such as omniglot, see 'recallk recipes', or a YAML "
            "file) or --resume RUN_DIR; see 'recallk train --help'"
        )
    elif not Path(config_path).exists() and is_recipe_name(str(config_path)):
        config_path = recipe_path(str(config_path))
    options = {"data.data_dir": args.data_dir, "output.run_dir": run_dir, "train.device": args.device}
    cfg = load_config(config_path, overrides, {k: v for k, v in options.items() if v is not None})
    if args.dry_run:
        from recallk.training.preflight import check_training_batches, preflight
        from recallk.training.resume_config import check_resume_config

        if args.resume is not None:
            check_resume_config(Path(run_dir), cfg)
        preflight(cfg)  # after the resume check: a changed data set is named as such
        check_training_batches(cfg)
        sys.stdout.write(config_to_yaml(_with_data_root(cfg)))
        return EXIT_OK
    from recallk.training.console import final_report
    from recallk.training.trainer import train

    summary = train(cfg, resume=args.resume is not None, progress=_progress(args))
    if summary:  # empty on the non-main ranks of a torchrun job
        print(final_report(summary))
    return EXIT_OK


def _with_data_root(cfg: Config) -> Config:
    """``cfg`` with ``data.data_dir`` set to the folder a run reads (``null`` stands for $RECALLK_DATA or the user
    cache), as an absolute path: what ``--dry-run`` shows."""
    import dataclasses

    from recallk.data.paths import resolve_data_dir

    root = str(resolve_data_dir(cfg.data.data_dir).absolute())
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=root))


def _cmd_evaluate(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(
            f"run directory or checkpoint '{path}' does not exist; pass a run directory created by 'recallk train'"
        )
    from recallk.evaluation.metrics import format_metrics_table
    from recallk.evaluation.revisited import format_revisited_table
    from recallk.training.evaluate_run import evaluate_benchmark, evaluate_run

    if args.benchmark is None and (args.distractors or args.scales or args.skip_bad_images):
        raise RecallkUsageError("--distractors, --scales and --skip-bad-images apply to a landmark benchmark; add "
                                "--benchmark NAME (a split's images follow the run's data.skip_bad_images)")
    if args.benchmark is not None and args.split is not None:
        raise RecallkUsageError("--benchmark and --split choose what to evaluate; pass one of them")
    if args.benchmark is not None:
        results = evaluate_benchmark(path, args.benchmark, data_dir=args.data_dir, distractors=args.distractors,
                                     scales=_scales(args.scales), device=args.device, progress=_progress(args),
                                     skip_bad_images=args.skip_bad_images)
        print(format_revisited_table(results))
    else:
        results = evaluate_run(
            path, split=args.split, data_dir=args.data_dir, device=args.device, progress=_progress(args)
        )
        print(format_metrics_table(results))
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent) / "evaluation.json"
    merged = {**_earlier_results(out), **results}  # other splits and benchmarks evaluated before are kept
    write_json(out, merged, sort_keys=False)
    splits = {name: value for name, value in merged.items() if "medium" not in value}
    benchmarks = {name: value for name, value in merged.items() if "medium" in value}  # Easy/Medium/Hard results
    tables = [format_metrics_table(splits)] * bool(splits) + [format_revisited_table(benchmarks)] * bool(benchmarks)
    atomic_write_text(out.with_suffix(".txt"), "\n\n".join(tables) + "\n")
    print(f"saved {out} and {out.with_suffix('.txt')} (splits: {', '.join(merged)})")
    return EXIT_OK


def _scales(tokens: list[str] | None) -> tuple[float, ...] | None:
    """``--scales`` as numbers: ``1 0.7071 0.5`` or cirtorch's ``'[1, 1/2**(1/2), 1/2]'`` (parsed, never evaluated)."""
    from recallk.evaluation.multiscale import parse_scales

    return None if tokens is None else parse_scales(" ".join(tokens))


def _earlier_results(path: Path) -> dict[str, Any]:
    """The ``{split: metrics}`` already in an evaluation JSON file (empty when absent or not such a file)."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(earlier, dict) or not all(isinstance(v, dict) for v in earlier.values()):
        return {}
    return earlier


def _cmd_embed(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise RecallkUsageError(f"--batch-size must be >= 1, got {args.batch_size}; pass e.g. --batch-size 256")
    if args.images or args.texts:
        if args.images and args.texts:
            raise RecallkUsageError("pass either --images or --texts, not both")
        from recallk.inference import embed_items

        out = embed_items(
            args.checkpoint, args.out, images=args.images or (), texts=args.texts,
            device=_resolved_device(args.device), batch_size=args.batch_size or 256, progress=_progress(args),
            skip_bad_images=args.skip_bad_images, max_image_pixels=_pixel_limit(args.max_image_pixels),
        )
        print(f"saved embeddings to {out}")
        return EXIT_OK
    from recallk.training.evaluate_run import export_embeddings

    out = export_embeddings(
        Path(args.checkpoint),
        Path(args.out),
        split=args.split,
        dataset=args.data,
        data_dir=args.data_dir,
        device=args.device,
        batch_size=args.batch_size,
        progress=_progress(args),
    )
    print(f"saved embeddings to {out}")
    return EXIT_OK


def _pixel_limit(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise RecallkUsageError(f"--max-image-pixels must be >= 1, got {value}; pass e.g. --max-image-pixels 300000000")
    return value


def _resolved_device(name: str) -> str:
    from recallk.engine.distributed import resolve_device

    return str(resolve_device(name))


def _cmd_search(args: argparse.Namespace) -> int:
    if args.top_k < 1 or args.batch_size < 1:
        raise RecallkUsageError("--top-k and --batch-size must be >= 1; pass e.g. --top-k 5")
    import recallk.inference as inference
    cache_folder = inference.search_cache_folder(args.model, args.cache)
    try:
        report = inference.search_run(
            args.model, args.gallery, args.query, top_k=args.top_k, out=args.out, device=_resolved_device(args.device),
            batch_size=args.batch_size, progress=_progress(args), cache_dir=args.cache, use_cache=not args.no_cache,
            skip_bad_images=args.skip_bad_images, max_image_pixels=_pixel_limit(args.max_image_pixels),
        )
    except OutputWriteError as err:
        in_cache = err.path.parent == cache_folder
        raise err.with_option("--cache DIR, or --no-cache" if in_cache else "--out FILE") from err.error
    if report["cache"] is None:
        print("gallery: embedded now (not cached: --no-cache)")
    else:
        print(f"gallery: {report['cache']} ({'cached' if report['cached'] else 'embedded now'})")
    for result in report["results"]:
        print(f"query {result['query']}")
        for rank, neighbour in enumerate(result["neighbours"], start=1):
            print(f"  {rank:2d}. {neighbour['similarity']:.4f}  {neighbour['path']}")
    print(f"saved {args.out} and one picture per query next to it")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    import recallk.pretrained as pretrained
    model = pretrained.load_model(args.model)
    if args.format == "pretrained":
        saved = model.save_pretrained(args.out, overwrite=args.overwrite)
        print(f"saved {saved} (model.safetensors, config.json, README.md)")
        return EXIT_OK
    import torch

    from recallk.models.export import export_network, load_exported

    if model.is_text:
        raise RecallkUsageError("a text model exports with --format pretrained only")
    shape = model.preprocess.input_shape  # (C, H, W) of a preprocessed image
    example = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0))
    out = export_network(model.network, example, args.out, args.format)
    with torch.no_grad():
        eager = model(example)  # the network at one scale: what the exported graph computes
    difference = float((load_exported(out, args.format)(example) - eager).abs().max())
    checked = f"; max |exported - eager| = {difference:.2e} on a batch of 4"
    print(f"saved {out} ({args.format}, input (B, {', '.join(map(str, shape))}){checked})")
    return EXIT_OK


def _cmd_whiten(args: argparse.Namespace) -> int:
    from recallk.inference import list_image_files
    from recallk.training.whiten_run import whiten_run

    if args.pairs and args.power is not None:
        raise RecallkUsageError("--power sets PCA whitening (--images); learned whitening (--pairs) has none")
    power = 0.5 if args.power is None else args.power
    images = list_image_files(args.images) if args.images else ()
    out, layer = whiten_run(
        args.path, pairs=args.pairs, images=images, dim=args.dim, power=power, out=args.out, force=args.force,
        data_dir=args.data_dir, device=args.device, scales=_scales(args.scales), progress=_progress(args),
        skip_bad_images=args.skip_bad_images,
    )
    kind = f"learned from pairs '{args.pairs}'" if args.pairs else f"PCA, power {power}"
    print(f"saved {out} (whitening {kind}, {layer.in_dim} -> {layer.out_dim} dims)")
    return EXIT_OK


def _cmd_recipes(args: argparse.Namespace) -> int:
    from recallk.recipes import copy_recipe, list_recipes

    if args.copy:
        print(f"wrote {copy_recipe(*args.copy)}")
        return EXIT_OK
    recipes = list_recipes()
    width = max(map(len, recipes))
    for name, summary in recipes.items():
        print(f"{name.ljust(width)}  {summary}")
    print("\ntrain one with 'recallk train NAME'; copy one to edit with 'recallk recipes --copy NAME DIR'")
    return EXIT_OK


def _cmd_config(args: argparse.Namespace) -> int:
    from recallk.config import explain_config

    print(explain_config(args.explain or None))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    import recallk.demo as demo
    demo.run_demo(data_dir=args.data_dir, run_dir=args.run_dir, device=args.device, progress=_progress(args))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def _one_line(err: BaseException) -> str:
    text = str(err)
    if "\nOriginal Traceback (most recent call last):" in text:
        # Re-raised by a DataLoader worker: keep the original message, not the worker's traceback.
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split()) or type(err).__name__


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse, letting ``train`` take ``key=value`` overrides after options too."""
    args, extras = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "train":
        args.overrides += [e for e in extras if "=" in e and not e.startswith("-")]
        extras = [e for e in extras if not ("=" in e and not e.startswith("-"))]
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    args = _parse(parser, list(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    debug = args.debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if debug else "%(message)s",
    )
    if getattr(args, "quiet", False):  # the console shows warnings only; a run's train.log keeps every line
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("recallk: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader left early (`recallk recipes | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return EXIT_BROKEN_PIPE
    except TrainingInterrupted as err:
        print(f"recallk: {_one_line(err)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingDiverged as err:
        if debug:
            traceback.print_exc()
        print(f"recallk: error: TrainingDiverged: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:  # noqa: BLE001 - the command line turns every failure into one line
        if debug:
            traceback.print_exc()
        if isinstance(err, OSError):  # e.g. a run directory made on a read-only file system
            err = OutputWriteError.from_os_error(err) or err
        if isinstance(err, OutputWriteError) and err.option is None and args.command in WRITE_OPTIONS:
            err = err.with_option(WRITE_OPTIONS[args.command])
        if isinstance(err, USAGE_ERRORS):
            hint = "" if debug or isinstance(err, RecallkUsageError) else " (rerun with --debug for the traceback)"
            print(f"recallk: error: {_one_line(err)}{hint}", file=sys.stderr)
            return EXIT_USAGE
        hint = "" if debug else "; rerun with --debug for the traceback"
        print(f"recallk: error: {type(err).__name__}: {_one_line(err)}{hint}", file=sys.stderr)
        return EXIT_FAILURE
