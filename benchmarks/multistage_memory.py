"""Peak memory and speed of one training step: multistage backward vs a plain full-batch backward.

A step is forward + RS@k loss + backward + Adam update on a batch of random images, 4 per class. With the
multistage backward the model's memory depends on the chunk, not on the batch; what still grows with the batch is
the batch itself, its N x D embeddings and the loss's O(N^2) similarity matrices, so a third method, `loss`,
measures the RS@k loss alone (forward + backward on N random embeddings) at the same N.

Every (method, batch) runs in a fresh subprocess so that its peak is its own:
  CPU:  peak RSS growth during the steps (ru_maxrss after - before; the batch and model are allocated before);
  CUDA: torch.cuda.max_memory_allocated over the timed steps (after one warm-up step), absolute.

    python benchmarks/multistage_memory.py                   # CPU: small CNN, 32 px, batch 256 and 4096, chunk 128
    python benchmarks/multistage_memory.py --device cuda     # timm resnet50, 224 px, bf16, channels_last,
                                                             # batch 4000 chunk 200 vs the largest plain batch
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from recallk.losses.recall_at_k import RecallAtKLoss
from recallk.training.batchnorm import freeze_batchnorm
from recallk.training.multistage import multistage_backward

EMBEDDING_DIM = 512
PLAIN_BATCH_CANDIDATES = (1024, 768, 512, 384, 256, 192, 128, 96, 64, 32, 16)


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


def build(device: str, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (frozen BatchNorm) and a random batch with 4 images per class."""
    torch.manual_seed(0)
    if device == "cuda":
        import timm

        model = Normalized(timm.create_model("resnet50", pretrained=False, num_classes=EMBEDDING_DIM))
        model = model.to(device, memory_format=torch.channels_last)
        images = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    else:
        model = SmallCNN()
        images = torch.randn(batch, 3, 32, 32)
    labels = (torch.arange(batch) // 4).to(device)
    return freeze_batchnorm(model).train(), images, labels


def measure(method: str, batch: int, chunk: int, device: str, steps: int) -> dict:
    """Peak memory (MiB) and images/s of `steps` training steps of one method at one batch size."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast_dtype = torch.bfloat16 if cuda else None
    loss_fn = RecallAtKLoss(k=(1, 2, 4, 8, 16), tau_rank=0.01)
    model, images, labels = build(device, batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if method == "multistage":
            multistage_backward(model, loss_fn, images, labels, chunk, autocast_dtype=autocast_dtype)
        elif method == "plain":
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                embeddings = model(images)
            loss_fn(embeddings.float(), labels).backward()
        else:  # the loss alone, on embeddings like the model's
            embeddings = F.normalize(torch.randn(batch, EMBEDDING_DIM, device=device), dim=1).requires_grad_()
            loss_fn(embeddings, labels).backward()
            return
        optimizer.step()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        step()  # warm-up: cuDNN autotuning and Adam state
        sync()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return {"method": method, "batch": batch, "peak_mib": peak_mib, "images_per_s": batch / seconds}


def run_isolated(method: str, batch: int, args: argparse.Namespace) -> dict:
    """`measure` in a fresh Python process; {"error": reason} when it fails (e.g. out of memory)."""
    command = [sys.executable, __file__, "--device", args.device, "--chunk", str(args.chunk), "--steps",
               str(args.steps), "--threads", str(args.threads), "--single", method, str(batch)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        reason = "out of memory" if "out of memory" in result.stderr.lower() else lines[-1]
        return {"method": method, "batch": batch, "error": reason}
    return json.loads(result.stdout.strip().splitlines()[-1])


def largest_plain_batch(args: argparse.Namespace) -> dict:
    """The first plain-backward batch in PLAIN_BATCH_CANDIDATES (largest first) that runs without error."""
    for batch in PLAIN_BATCH_CANDIDATES:
        result = run_isolated("plain", batch, args)
        if "error" not in result:
            return result
        print(f"<!-- plain backward, batch {batch}: {result['error']} -->", flush=True)
    return {"method": "plain", "batch": PLAIN_BATCH_CANDIDATES[-1], "error": "no batch size fits"}


def machine_description(device: str, threads: int) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    return f"{model or platform.machine()}, {threads} thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", help="batch sizes (default: 256 4096 on CPU, 4000 on CUDA)")
    parser.add_argument("--chunk", type=int, help="multistage chunk size (default: 128 on CPU, 200 on CUDA)")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per measurement")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--single", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.chunk = args.chunk or (200 if cuda else 128)
    torch.set_num_threads(args.threads)
    if args.single:
        method, batch = args.single[0], int(args.single[1])
        print(json.dumps(measure(method, batch, args.chunk, args.device, args.steps)))
        return
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    sizes = args.sizes or ([4000] if cuda else [256, 4096])
    setup = (
        "timm resnet50 (random init), 224 px, bf16 autocast, channels_last"
        if cuda
        else "small CNN (3 conv blocks), 32 px, float32"
    )
    print(
        f"Training step (forward, RS@k, backward, Adam), {setup}, embedding {EMBEDDING_DIM}, 4 images/class; "
        f"{machine_description(args.device, args.threads)}, torch {torch.__version__}, {datetime.date.today()}; "
        f"command: python benchmarks/multistage_memory.py {' '.join(sys.argv[1:])}\n"
    )
    print("| method | batch | chunk | peak memory (MiB) | images/s |")
    print("|---|---|---|---|---|")
    rows = [run_isolated("multistage", n, args) for n in sizes]
    if cuda:
        rows.append(largest_plain_batch(args))
    else:
        rows += [run_isolated("plain", n, args) for n in sizes] + [run_isolated("loss", n, args) for n in sizes]
    for row in rows:
        chunk = args.chunk if row["method"] == "multistage" else "-"
        name = {"loss": "RS@k loss alone"}.get(row["method"], row["method"])
        if "error" in row:
            print(f"| {name} | {row['batch']} | {chunk} | {row['error']} | - |")
        else:
            print(f"| {name} | {row['batch']} | {chunk} | {row['peak_mib']:.0f} | {row['images_per_s']:.0f} |")


if __name__ == "__main__":
    main()
