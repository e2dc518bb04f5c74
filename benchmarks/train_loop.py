"""The whole training loop, measured: ``recallk train`` (a subprocess) beside the bare step of the same model.

For each ``--arm`` (a name and config overrides on top of ``--config`` and ``--set``) it runs the real
``recallk train``, reads the run's ``summary.json`` (seconds per phase of the loop, ``recallk.training.phases``;
peak GPU memory; test metrics), then times the bare step of the same config in this process: random inputs
already on the device, the multistage engine's three stages (no-grad forward, loss and its gradient, re-forward
and backward) and the optimiser, each ended by a device synchronisation. One markdown row per arm:

- ``loop img/s``: images of the training steps after the first / (data wait + forward-backward + optimizer) of
  those steps; the first step (loader start-up, compilation, autotuning) is its own column;
- ``bare img/s``: batch / the bare step's seconds (mean over ``--bare-steps`` after ``--bare-warmup``);
- ``loop/bare``: what the data pipeline, the trainer's bookkeeping and the engine's synchronisations cost;
- per-step seconds of each phase of the loop and of each stage of the bare step; ``eval s``: validation and test.

``--jpegs DIR`` first writes (or keeps) the JPEG folder of ``benchmarks/make_jpeg_folder.py`` there and trains
on it (``--data-dir DIR``). Run directories go under ``--out``.

    python benchmarks/train_loop.py --config omniglot_efficientnet_lite0 --device cuda \\
        --set data.image_size=96 data.batch_size=4096 data.samples_per_class=8 train.chunk_size=1024 \\
        --arm eager
    python benchmarks/train_loop.py --config benchmarks/configs/jpeg_resnet50.yaml --device cuda --jpegs /tmp/j \\
        --arm compiled_gpu model.compile=true data.decode=gpu --arm compiled_cpu model.compile=true
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from recallk.config import Config, load_config
from recallk.engine.multistage import backward_through_chunks, embed_without_graph, loss_and_embedding_grad
from recallk.recipes import is_recipe_name, recipe_path
from recallk.training.assemble import build_loss_from_config, build_network, resolve_precision

HERE = Path(__file__).resolve().parent
COLUMNS = ["arm", "steps", "loop img/s", "bare img/s", "loop/bare", "data s", "fwd+bwd s", "optimizer s",
           "first step s", "eval s", "bare no-grad fwd s", "bare loss s", "bare re-fwd+bwd s", "bare optimizer s",
           "peak GiB loop", "peak GiB bare", "test recall@1", "test map@r", "status"]  # fmt: skip
STAGES = ("no_grad_forward", "loss", "forward_backward", "optimizer")


def run_training(config: str, overrides: list[str], data_dir: str | None, run_dir: Path, timeout: float) -> dict:
    """``recallk train CONFIG OVERRIDES`` into ``run_dir`` (emptied first); its ``summary.json``."""
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "recallk", "train", config, "--run-dir", str(run_dir), *overrides]
    if data_dir:
        command += ["--data-dir", data_dir]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"recallk train exited with {done.returncode}: {lines[-1]}")
    return json.loads((run_dir / "summary.json").read_text())


def bare_step(config: Config, device: torch.device, steps: int, warmup: int) -> dict[str, float]:
    """Seconds per stage of the bare training step of ``config`` (mean over ``steps`` after ``warmup``) and the
    peak GPU memory (GiB, CUDA only) of the measured steps."""
    torch.manual_seed(config.seed)
    model = build_network(config).to(device)
    train_model = torch.compile(model) if config.model.compile else model
    batch, per_class = config.data.batch_size, config.data.samples_per_class
    loss_fn = build_loss_from_config(config, batch // per_class).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    amp = resolve_precision(config, device)
    size = config.data.image_size
    images = torch.randn(batch, config.model.in_chans or 3, size, size, device=device)
    labels = torch.arange(batch, device=device) // per_class
    chunk = min(config.train.chunk_size, batch)
    cuda = device.type == "cuda"

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    totals = dict.fromkeys(STAGES, 0.0)
    for step in range(warmup + steps):
        if step == warmup and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = sync()
        first = embed_without_graph(train_model, images, chunk, amp)
        marks = [sync()]
        _, grad = loss_and_embedding_grad(loss_fn, first.embeddings, labels)
        first.embeddings = first.embeddings[:0]
        marks.append(sync())
        backward_through_chunks(train_model, images, first, grad)
        marks.append(sync())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(sync())
        if step >= warmup:
            for stage, begin, end in zip(STAGES, [start, *marks], marks):
                totals[stage] += (end - begin) / steps
    result = dict(totals)
    result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    del model, train_model, optimizer, images
    if cuda:
        torch.cuda.empty_cache()
    return result


def table_row(arm: str, config: Config, summary: dict, bare: dict[str, float]) -> dict[str, str]:
    """One markdown row (see ``COLUMNS``) from a run's summary and the bare step of its config."""
    phases = summary.get("phase_seconds", {})
    counted = summary["steps"] - 1  # the first step is in phases["first_step"]
    batch = config.data.batch_size
    loop_seconds = sum(phases.get(p, 0.0) for p in ("data", "forward_backward", "optimizer"))
    loop_rate = counted * batch / loop_seconds if counted > 0 and loop_seconds > 0 else float("nan")
    bare_rate = batch / sum(bare[s] for s in STAGES)

    def per_step(phase: str) -> str:
        return f"{phases.get(phase, 0.0) / counted:.3f}" if counted > 0 else "-"

    peak = summary.get("peak_gpu_memory_gib")
    cuda = not math.isnan(bare["peak_gib"])
    return {
        "arm": arm, "steps": str(summary["steps"]), "loop img/s": f"{loop_rate:.0f}", "bare img/s": f"{bare_rate:.0f}",
        "loop/bare": f"{loop_rate / bare_rate:.2f}", "data s": per_step("data"),
        "fwd+bwd s": per_step("forward_backward"), "optimizer s": per_step("optimizer"),
        "first step s": f"{phases.get('first_step', 0.0):.1f}", "eval s": f"{phases.get('evaluation', 0.0):.1f}",
        "bare no-grad fwd s": f"{bare['no_grad_forward']:.3f}", "bare loss s": f"{bare['loss']:.3f}",
        "bare re-fwd+bwd s": f"{bare['forward_backward']:.3f}", "bare optimizer s": f"{bare['optimizer']:.3f}",
        "peak GiB loop": f"{peak:.1f}" if peak is not None else "-",
        "peak GiB bare": f"{bare['peak_gib']:.1f}" if cuda else "-",
        "test recall@1": f"{summary['recall@1']:.4f}", "test map@r": f"{summary['map@r']:.4f}", "status": "ok",
    }  # fmt: skip


def print_row(values: dict[str, str]) -> None:
    print("| " + " | ".join(values.get(column, "-") for column in COLUMNS) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="bundled recipe name or YAML file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every arm")
    parser.add_argument("--arm", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"),
                        help="an arm: its name, then its own overrides (repeat for several)")
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--data-dir", help="data root (default: $RECALLK_DATA)")
    parser.add_argument("--jpegs", type=Path, help="write the JPEG folder here first and train on it")
    parser.add_argument("--jpeg-images", type=int, default=20000)
    parser.add_argument("--jpeg-classes", type=int, default=1000)
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=(500, 375), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--bare-steps", type=int, default=3)
    parser.add_argument("--bare-warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/recallk_train_loop"), help="run directories")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per training run")
    args = parser.parse_args()
    device = torch.device(args.device)
    data_dir = args.data_dir
    config_file = str(recipe_path(args.config)) if is_recipe_name(args.config) else args.config
    if args.jpegs is not None:
        sys.path.insert(0, str(HERE))
        from make_jpeg_folder import make_folder

        began = time.perf_counter()
        made = make_folder(args.jpegs, args.jpeg_images, args.jpeg_classes, tuple(args.jpeg_size))
        print(f"JPEG folder {args.jpegs}: {made['files']} files, {made['bytes'] / 2**20:.0f} MiB, "
              f"{time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
        data_dir = str(args.jpegs)
    print(f"`{args.config}` on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'the CPU'}, "
          f"{os.cpu_count()} CPUs; every arm: {' '.join(args.set) or '(recipe as is)'}\n")  # fmt: skip
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)
    bare_cache: dict[str, dict[str, float]] = {}
    failed = False
    for name, *own in args.arm:
        overrides = [*args.set, f"train.device={args.device}", *own]
        try:
            config = load_config(config_file, overrides)
            summary = run_training(config_file, overrides, data_dir, args.out / name, args.timeout)
            key = json.dumps([str(config.model), str(config.loss), config.data.batch_size, config.data.image_size,
                              config.train.chunk_size, config.train.amp], sort_keys=True)  # fmt: skip
            if key not in bare_cache:
                bare_cache[key] = bare_step(config, device, args.bare_steps, args.bare_warmup)
            print_row(table_row(name, config, summary, bare_cache[key]))
        except Exception as exc:  # noqa: BLE001 -- one arm's failure is a row; the others still run
            failed = True
            print_row({"arm": name, "status": f"FAILED: {' '.join(str(exc).split())[:300]}"})
    print("\noverrides per arm: " + "; ".join(f"{name}: {' '.join(own) or '-'}" for name, *own in args.arm))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
