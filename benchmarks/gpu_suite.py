"""The GPU benchmark suite in one command (``make bench-gpu``): about 8 minutes on one H100/H200-class GPU.

Sections, each a fresh subprocess of an existing benchmark script (so each measures its own peak memory):

- ``loss``: RS@k forward + backward at N = 4k, 16k, 64k, with and without SiMix (all same-class pairs), beside
  the two-matrix-product floor (``benchmarks/loss_speed.py``: time, ``torch.cuda.max_memory_allocated``), and
  the authors' per-query loop at 4k, one repeat, on random embeddings (most gradients exactly zero);
- ``loss_trained``: the same without the loop (SiMix to 16k), on trained-like embeddings (nearly every pair has
  a gradient);
- ``loss_chunk_1024``, ``loss_chunk_4096``: RS@k at 64k on trained-like embeddings with ``query_chunk`` 1024 and
  4096 instead of the default 256 (bigger products, fewer Python steps; memory grows with the chunk), to choose
  the default for GPUs;
- ``multistage``: timm ResNet-50 (random weights, 224 px, bf16, channels_last), a multistage step at batch 4000,
  chunk 200, against the largest plain batch that fits (``benchmarks/multistage_memory.py``: images/s, peak);
- ``knn``: exact kNN evaluation of 60k x 60k x 512 (``benchmarks/eval_speed.py``).

Writes ``OUT/gpu_suite.json`` (per section: command, seconds, return code, the parsed table rows and the raw
output) and ``OUT/gpu_suite.md`` (the sections' markdown tables). A failing section is recorded and the suite
goes on. ``--quick`` runs the same sections at tiny sizes on the CPU, in about a minute, so that a test keeps the
suite working on machines without a GPU.

    python benchmarks/gpu_suite.py                    # on a GPU machine, writes benchmarks/results/gpu_suite/
    python benchmarks/gpu_suite.py --quick --out /tmp/suite
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def sections(quick: bool) -> dict[str, list[str]]:
    """Section name -> the benchmark command line (script and flags) it runs."""
    if quick:
        return {
            "loss": ["loss_speed.py", "--device", "cpu", "--sizes", "256", "512", "--small-max-n", "256",
                     "--simix-max-n", "512", "--impls", "floor", "recallk", "floor_simix", "recallk_simix", "loop",
                     "--repeats", "1"],
            "loss_trained": ["loss_speed.py", "--device", "cpu", "--sizes", "256", "--embeddings", "trained",
                             "--impls", "floor", "recallk", "floor_simix", "recallk_simix", "--repeats", "1"],
            **{f"loss_chunk_{chunk}": ["loss_speed.py", "--device", "cpu", "--sizes", "256", "--embeddings",
                                       "trained", "--impls", "recallk", "--repeats", "1", "--query-chunk", str(chunk)]
               for chunk in (16, 64)},
            "multistage": ["multistage_memory.py", "--device", "cpu", "--sizes", "16", "--chunk", "8", "--steps", "1",
                           "--compile", "off"],
            "knn": ["eval_speed.py", "--device", "cpu", "--n", "2000", "--dim", "64", "--header"],
        }  # fmt: skip
    return {
        "loss": ["loss_speed.py", "--device", "cuda", "--sizes", "4096", "16384", "65536", "--small-max-n", "4096",
                 "--simix-max-n", "65536", "--impls", "floor", "recallk", "floor_simix", "recallk_simix", "loop",
                 "--repeats", "1"],
        "loss_trained": ["loss_speed.py", "--device", "cuda", "--sizes", "4096", "16384", "65536",
                         "--embeddings", "trained", "--simix-max-n", "16384",
                         "--impls", "floor", "recallk", "floor_simix", "recallk_simix", "--repeats", "1"],
        **{f"loss_chunk_{chunk}": ["loss_speed.py", "--device", "cuda", "--sizes", "65536", "--embeddings", "trained",
                                   "--impls", "recallk", "--repeats", "1", "--query-chunk", str(chunk)]
           for chunk in (1024, 4096)},
        "multistage": ["multistage_memory.py", "--device", "cuda", "--sizes", "4000", "--chunk", "200",
                       "--compile", "off"],
        "knn": ["eval_speed.py", "--device", "cuda", "--n", "60000", "--dim", "512", "--header"],
    }  # fmt: skip


def table_rows(output: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``output``, as dicts keyed by its header."""
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return []
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, body = cells[0], [row for row in cells[2:] if len(row) == len(cells[0])]
    return [dict(zip(header, row)) for row in body]


def run_section(name: str, command: list[str], timeout: float) -> dict:
    """Run one section's script; its failure (or timeout) is recorded, not raised."""
    full = [sys.executable, str(HERE / command[0]), *command[1:]]
    start = time.perf_counter()
    try:
        done = subprocess.run(full, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
        returncode, output, error = done.returncode, done.stdout, done.stderr[-4000:]
    except subprocess.TimeoutExpired as exc:
        returncode, output, error = -1, exc.stdout or "", f"timed out after {timeout:.0f} s"
        output = output.decode() if isinstance(output, bytes) else output
    return {
        "command": "python benchmarks/" + " ".join(command),
        "seconds": round(time.perf_counter() - start, 1),
        "returncode": returncode,
        "rows": table_rows(output),
        "output": output,
        "error": error if returncode != 0 else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (the suite's own test)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_suite", help="output directory")
    parser.add_argument("--section-timeout", type=float, default=600.0, help="seconds before a section is stopped")
    args = parser.parse_args()
    if not args.quick and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --quick for the CPU smoke run")
    machine = torch.cuda.get_device_name() if not args.quick else f"{platform.machine()} CPU (--quick)"
    report = {"machine": machine, "date": str(datetime.date.today()), "torch": torch.__version__, "sections": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = [f"# GPU suite: {machine}, torch {torch.__version__}, {report['date']}\n"]
    for name, command in sections(args.quick).items():
        result = run_section(name, command, args.section_timeout)
        report["sections"][name] = result
        status = "ok" if result["returncode"] == 0 else f"FAILED ({result['error'].strip().splitlines()[-1:]})"
        print(f"{name}: {status} in {result['seconds']} s", flush=True)
        markdown += [f"## {name} ({result['seconds']} s, {status})\n", f"`{result['command']}`\n", result["output"]]
    (args.out / "gpu_suite.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_suite.md").write_text("\n".join(markdown))
    print(f"wrote {args.out / 'gpu_suite.json'} and {args.out / 'gpu_suite.md'}")
    if any(section["returncode"] != 0 for section in report["sections"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
