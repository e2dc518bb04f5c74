"""Training throughput and peak memory of one step: multistage backward vs a plain full-batch backward.

A step is forward + RS@k loss + backward + optimiser update on a batch of random images, 4 per class. With the
multistage backward the model's memory depends on the chunk, not on the batch; what still grows with the batch is
the batch itself, its N x D embeddings and the loss's working memory (O(query_chunk x N)), so the synthetic CPU
setting also measures the RS@k loss alone (`loss`: forward + backward on N random embeddings) at the same N.

Settings (--setting):
  synthetic  CPU: a small CNN (3 conv blocks) on 32 px RGB, float32, frozen BatchNorm, 512-d, Adam; multistage
             (chunk 128), plain and the loss alone at batch 256 and 4096.
             CUDA: timm resnet50 (random init), 224 px, bf16 autocast, channels_last, frozen BatchNorm, 512-d, Adam;
             multistage at batch 4000, chunk 200, against a plain backward at the largest batch that fits.
  omniglot   CPU only: the Omniglot recipe's model (omniglot_cnn 32-64-128-256, 1 x 28 x 28, average pool, 128-d,
             no LayerNorm), AdamW, float32; a plain step with BatchNorm in training mode (the demo's step), and with
             GroupNorm (norm="group", no batch statistics, so it can be chunked) a plain and a multistage step;
             batch 512 and 4096, chunk 256.

Every measurement runs in a fresh subprocess so that its peak is its own; an error (e.g. out of memory) becomes a
row of the table instead of ending the run.
  CPU:  growth of the peak RSS (Linux VmHWM, reset through /proc/self/clear_refs) over the timed steps, from the RSS
        just before them; the model and the batch are allocated before.
  CUDA: torch.cuda.max_memory_allocated over the timed steps, absolute.
A warm-up step, neither timed nor measured, comes first on CUDA (cuDNN autotuning, optimiser state) and with
torch.compile (the compilation). So on the CPU without compile the first step's allocations (optimiser state,
memory the allocator keeps) count; with compile, what the warm-up left allocated does not.
--compile {off,on,both} wraps the model in torch.compile(model); default both on CUDA, off on CPU.

FLOPs of one step are counted with torch.utils.flop_counter.FlopCounterMode, which counts matrix products and
convolutions (the matrix units' work), not elementwise operations. With N the batch, b = min(chunk, N) and D the
embedding size:

    FLOPs(step) = (N / b) * FLOPs(model passes on b rows) + FLOPs(RS@k forward + backward on N x D embeddings)

where the model passes are forward + backward, plus for multistage its first, gradient-free forward. This equals a
count over the whole step (every counted model operation works row by row) without its time or memory peak, and
is the same with and without torch.compile. TFLOP/s = FLOPs(step) / seconds per step; % of peak divides it by
--peak-tflops, which on CUDA defaults to the GPU's dense bf16 tensor-core peak looked up by its name.

    python benchmarks/multistage_memory.py                                 # synthetic, CPU
    python benchmarks/multistage_memory.py --setting omniglot --threads 2  # Omniglot recipe model, CPU
    python benchmarks/multistage_memory.py --device cuda                   # ResNet-50, eager and compiled
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from recallk.engine.batchnorm import freeze_batchnorm
from recallk.engine.multistage import multistage_backward
from recallk.losses.recall_at_k import RecallAtKLoss

EMBEDDING_DIM = 512  # synthetic setting
OMNIGLOT_EMBEDDING_DIM = 128
OMNIGLOT_WIDTHS = (32, 64, 128, 256)
PLAIN_BATCH_CANDIDATES = (2048, 1536, 1024, 768, 512, 384, 256, 192, 128, 96, 64, 32, 16)
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets, matched in order against
# torch.cuda.get_device_name() (H100 SXM reports itself as "NVIDIA H100 80GB HBM3").
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 80GB HBM3", 989.0), ("H100 SXM", 989.0), ("H200", 989.0),
                    ("A100", 312.0))  # fmt: skip
METHOD_NAMES = {"multistage": "multistage", "plain": "plain", "loss": "RS@k loss alone"}
NORM_NAMES = {"batch": "BatchNorm", "group": "GroupNorm"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: a method ("multistage", "plain" or "loss") at one batch size.

    ``norm`` is the omniglot_cnn normalisation ("batch": BatchNorm in training mode, "group": GroupNorm); the
    synthetic setting always uses frozen BatchNorm and ignores it.
    """

    method: str
    batch: int
    norm: str = "batch"
    compile: bool = False


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (32, 64, 128 channels; the last two stride 2), average pool, linear, L2 norm."""

    def __init__(self, dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        blocks = []
        for c_in, c_out, stride in ((3, 32, 1), (32, 64, 2), (64, 128, 2)):
            blocks += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(images)), dim=1)


class Normalized(nn.Module):
    """L2-normalised output of a backbone."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(images), dim=1)


def build(setting: str, device: str, case: Case) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    """The model in training mode, a random batch (N, C, H, W) with labels (N,) of 4 images per class, the optimiser."""
    torch.manual_seed(0)
    if setting == "omniglot":
        from recallk.models import create_model  # loads timm (seconds), which the synthetic CPU setting does not need

        model: nn.Module = create_model(
            "omniglot_cnn", embed_dim=OMNIGLOT_EMBEDDING_DIM, pooling="avg", layernorm=False, widths=OMNIGLOT_WIDTHS,
            in_chans=1, norm=case.norm,
        )
        images = torch.randn(case.batch, 1, 28, 28)
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    else:
        if device == "cuda":
            import timm

            model = Normalized(timm.create_model("resnet50", pretrained=False, num_classes=EMBEDDING_DIM))
            model = model.to(device, memory_format=torch.channels_last)
            images = torch.randn(case.batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
        else:
            model = SmallCNN()
            images = torch.randn(case.batch, 3, 32, 32)
        model = freeze_batchnorm(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    labels = (torch.arange(case.batch) // 4).to(device)
    return model.train(), images, labels, optimizer


def autocast_context(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, dtype)``, or nothing when ``dtype`` is None (float32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def counted_flops(run: Callable[[], Any]) -> tuple[int, Any]:
    """FLOPs of the matrix products and convolutions that ``run()`` executes, and what it returns."""
    with FlopCounterMode(display=False) as counter:
        result = run()
    return counter.get_total_flops(), result


def loss_flops(loss_fn: nn.Module, labels: torch.Tensor, dim: int) -> int:
    """FLOPs of the loss's forward + backward on N x ``dim`` unit-norm embeddings, N = len(labels)."""
    embeddings = F.normalize(torch.randn(len(labels), dim, device=labels.device), dim=1).requires_grad_()
    return counted_flops(lambda: loss_fn(embeddings, labels).backward())[0]


def step_flops(method: str, model: nn.Module, loss_fn: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               chunk: int, autocast_dtype: torch.dtype | None) -> int:  # fmt: skip
    """FLOPs of one training step, (N / b) * FLOPs(model passes on b rows) + FLOPs(loss on N x D); see the module
    docstring. ``model`` must be the eager module (not its torch.compile wrapper); its ``.grad`` accumulate."""
    if method == "loss":
        return loss_flops(loss_fn, labels, EMBEDDING_DIM)
    rows = min(chunk, len(images))
    sample = images[:rows]

    def forward() -> None:
        with torch.no_grad(), autocast_context(images.device.type, autocast_dtype):
            model(sample)

    def forward_backward() -> int:
        with autocast_context(images.device.type, autocast_dtype):
            embeddings = model(sample)
        embeddings.backward(torch.randn_like(embeddings))
        return embeddings.shape[1]

    model_rows, dim = counted_flops(forward_backward)
    if method == "multistage":
        model_rows += counted_flops(forward)[0]
    return round(model_rows * len(images) / rows) + loss_flops(loss_fn, labels, dim)


def peak_rss_mib(field: str = "VmHWM") -> float:
    """The process's peak (VmHWM) or current (VmRSS) resident set size in MiB, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))
    return kib / 1024


def reset_peak_rss() -> float:
    """Reset the peak RSS to the current RSS (Linux ``clear_refs`` 5) and return it in MiB."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return peak_rss_mib("VmRSS")


def measure(setting: str, device: str, case: Case, chunk: int, steps: int) -> dict:
    """Peak memory (MiB), images/s and FLOPs per step of ``steps`` timed training steps of one case."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast_dtype = torch.bfloat16 if cuda else None
    loss_fn = RecallAtKLoss(k=(1, 2, 4, 8, 16), tau_rank=0.01)
    model, images, labels, optimizer = build(setting, device, case)
    net = torch.compile(model) if case.compile else model

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if case.method == "multistage":
            multistage_backward(net, loss_fn, images, labels, chunk, autocast_dtype=autocast_dtype)
        elif case.method == "plain":
            with autocast_context(device, autocast_dtype):
                embeddings = net(images)
            loss_fn(embeddings.float(), labels).backward()
        else:  # the loss alone, on embeddings like the model's
            embeddings = F.normalize(torch.randn(case.batch, EMBEDDING_DIM, device=device), dim=1).requires_grad_()
            loss_fn(embeddings, labels).backward()
            return
        optimizer.step()

    if cuda or case.compile:
        step()  # warm-up: compilation, cuDNN autotuning, optimiser state
        sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = 0.0 if cuda else reset_peak_rss()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib() - rss_before
    flops = step_flops(case.method, model, loss_fn, images, labels, chunk, autocast_dtype)
    return {**dataclasses.asdict(case), "peak_mib": peak_mib, "images_per_s": case.batch / seconds,
            "flops": flops, "tflops_per_s": flops / seconds / 1e12}  # fmt: skip


def run_isolated(case: Case, args: argparse.Namespace) -> dict:
    """`measure` in a fresh Python process; the case with {"error": reason} when it fails (e.g. out of memory)."""
    command = [sys.executable, __file__, "--setting", args.setting, "--device", args.device, "--chunk",
               str(args.chunk), "--steps", str(args.steps), "--threads", str(args.threads),
               "--single", json.dumps(dataclasses.asdict(case))]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        reason = "out of memory" if "out of memory" in result.stderr.lower() else lines[-1].replace("|", "/")[:200]
        return {**dataclasses.asdict(case), "error": reason}
    return json.loads(result.stdout.strip().splitlines()[-1])


def largest_plain_batch(args: argparse.Namespace, compiled: bool, candidates: Sequence[int]) -> Iterator[dict]:
    """Plain-backward rows for ``candidates`` (largest first) up to the first that runs without error."""
    for batch in candidates:
        result = run_isolated(Case("plain", batch, compile=compiled), args)
        yield result
        if "error" not in result:
            return


def cuda_rows(sizes: Sequence[int], modes: Sequence[bool], args: argparse.Namespace) -> Iterator[dict]:
    """Multistage at ``sizes``, then the plain search down to the largest batch that fits, for each compile mode.

    The plain candidates are ``args.plain_sizes``, largest first; the compiled search starts one candidate above
    the eager result (compiling rarely needs more memory), to save compilations of batches that cannot fit."""
    for compiled in modes:
        for n in sizes:
            yield run_isolated(Case("multistage", n, compile=compiled), args)
    candidates = sorted(set(args.plain_sizes), reverse=True)
    start = 0
    for compiled in modes:
        for row in largest_plain_batch(args, compiled, candidates[start:]):
            yield row
            if "error" not in row:
                start = max(candidates.index(row["batch"]) - 1, 0)


def cpu_cases(setting: str, sizes: Sequence[int], modes: Sequence[bool]) -> list[Case]:
    """The CPU measurements of a setting, grouped by method, then compile mode, then batch size."""
    if setting == "omniglot":
        methods = (("plain", "batch"), ("plain", "group"), ("multistage", "group"))
        return [Case(method, n, norm, compiled) for method, norm in methods for compiled in modes for n in sizes]
    model_cases = [Case(m, n, compile=compiled) for m in ("multistage", "plain") for compiled in modes for n in sizes]
    return model_cases + [Case("loss", n) for n in sizes]


def device_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 tensor-core peak of a GPU known by name (PEAK_BF16_TFLOPS), or None."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in device_name.lower()), None)


def machine_description(device: str, threads: int) -> str:
    """The GPU's name, or the CPU model and the thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    return f"{model or platform.machine()}, {threads} thread(s)"


def setup_description(setting: str, cuda: bool) -> str:
    """Model, input, precision and optimiser of a setting, for the table's title."""
    if setting == "omniglot":
        return (f"omniglot_cnn {'-'.join(map(str, OMNIGLOT_WIDTHS))} (avg pool, {OMNIGLOT_EMBEDDING_DIM}-d), "
                "1 x 28 x 28, float32, AdamW")  # fmt: skip
    if cuda:
        return f"timm resnet50 (random init), 224 px, bf16 autocast, channels_last, {EMBEDDING_DIM}-d, Adam"
    return f"small CNN (3 conv blocks), 32 px, float32, {EMBEDDING_DIM}-d, Adam"


def table_row(row: dict, setting: str, chunk: int, peak_tflops: float | None) -> str:
    """One markdown row: method, batch, chunk, compile, peak memory, images/s, TFLOP/s, % of peak."""
    name = METHOD_NAMES[row["method"]]
    if setting == "omniglot":
        name += f" ({NORM_NAMES[row['norm']]})"
    chunk_text = str(chunk) if row["method"] == "multistage" else "-"
    compile_text = "-" if row["method"] == "loss" else ("yes" if row["compile"] else "no")
    cells = [name, str(row["batch"]), chunk_text, compile_text]
    if "error" in row:
        return "| " + " | ".join([*cells, row["error"], "-", "-", "-"]) + " |"
    percent = "-" if peak_tflops is None else f"{100 * row['tflops_per_s'] / peak_tflops:.1f}"
    cells += [f"{row['peak_mib']:.0f}", f"{row['images_per_s']:.0f}", f"{row['tflops_per_s']:.3g}", percent]
    return "| " + " | ".join(cells) + " |"


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    if not text.strip().isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; fills in the per-setting defaults of --sizes, --chunk and --compile."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=("synthetic", "omniglot"), default="synthetic")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", type=positive_int, nargs="+",
                        help="batch sizes (default: 256 4096 synthetic CPU, 4000 CUDA, 512 4096 omniglot)")
    parser.add_argument("--chunk", type=positive_int,
                        help="multistage chunk size (default: 128 CPU, 200 CUDA, 256 omniglot)")
    parser.add_argument("--compile", choices=("off", "on", "both"),
                        help="torch.compile the model: off, on, or both one after the other (default: both on CUDA, "
                             "off on CPU)")  # fmt: skip
    parser.add_argument("--peak-tflops", type=positive_float,
                        help="matrix-unit peak for the %% of peak column (default on CUDA: dense bf16 peak of a known "
                             "GPU: H100 SXM/H200 989, H100 PCIe 756, A100 312)")  # fmt: skip
    parser.add_argument("--plain-sizes", type=positive_int, nargs="+", default=list(PLAIN_BATCH_CANDIDATES),
                        help="CUDA: plain-backward batch sizes to try, largest first, down to the first that fits "
                             f"(default: {' '.join(map(str, PLAIN_BATCH_CANDIDATES))})")  # fmt: skip
    parser.add_argument("--steps", type=positive_int, default=2, help="timed training steps per measurement")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--single", metavar="CASE_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.setting == "omniglot" and cuda:
        parser.error("--setting omniglot is the CPU demo's training step; drop --device cuda "
                     "(the CUDA benchmark is --setting synthetic)")  # fmt: skip
    omniglot = args.setting == "omniglot"
    args.sizes = args.sizes or ([512, 4096] if omniglot else [4000] if cuda else [256, 4096])
    args.chunk = args.chunk or (256 if omniglot else 200 if cuda else 128)
    args.compile = args.compile or ("both" if cuda else "off")
    return args


def main() -> None:
    args = parse_arguments()
    torch.set_num_threads(args.threads)
    if args.single:
        case = Case(**json.loads(args.single))
        print(json.dumps(measure(args.setting, args.device, case, args.chunk, args.steps)))
        return
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; run on a GPU machine or use --device cpu")
    peak_tflops = args.peak_tflops
    if cuda and peak_tflops is None:
        peak_tflops = device_peak_tflops(torch.cuda.get_device_name())
        if peak_tflops is None:
            raise SystemExit(f"no known bf16 peak for GPU '{torch.cuda.get_device_name()}'; pass --peak-tflops "
                             "with its dense bf16 tensor-core TFLOP/s")  # fmt: skip
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    peak_text = f"; matrix-unit peak {peak_tflops:g} TFLOP/s" if peak_tflops else ""
    print(
        f"Training step (forward, RS@k, backward, optimiser step), {setup_description(args.setting, cuda)}, "
        f"4 images/class; {machine_description(args.device, args.threads)}{peak_text}, torch {torch.__version__}, "
        f"{datetime.date.today()}; command: python benchmarks/multistage_memory.py {' '.join(sys.argv[1:])}\n"
    )
    print("| method | batch | chunk | compile | peak memory (MiB) | images/s | TFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    if cuda:
        rows = cuda_rows(args.sizes, modes, args)
    else:
        rows = (run_isolated(case, args) for case in cpu_cases(args.setting, args.sizes, modes))
    for row in rows:
        print(table_row(row, args.setting, args.chunk, peak_tflops), flush=True)


if __name__ == "__main__":
    main()
