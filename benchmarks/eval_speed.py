"""Time `retrieval_metrics` on an all-vs-all retrieval problem shaped like Stanford Online Products (test split).

Embeddings are clustered: each class has a random Gaussian centre and its items are the centre plus Gaussian
noise, L2-normalised; class sizes are drawn uniformly from 2..12 (as in SOP). Prints one markdown table row per
device (peak RSS is the process maximum so far, so a cuda row after a cpu row includes the cpu run):

    | machine | N | d | backend | device | chunk | seconds | peak RSS MB | recall@1 |

Usage: python benchmarks/eval_speed.py [--n 60000] [--dim 512] [--device all|cpu|cuda] [--backend torch|faiss]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from recallk.evaluation import retrieval_metrics
from recallk.evaluation.metrics import DEFAULT_CHUNK_SIZE

NOISE_SCALE = 2.2  # noise std relative to the unit-variance class centres; gives recall@1 ~ 0.8 at N=60000
HEADER = (
    "| machine | N | d | backend | device | chunk | seconds | peak RSS MB | recall@1 |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def sop_like_labels(num_items: int, generator: torch.Generator) -> torch.Tensor:
    """``(num_items,)`` class ids with class sizes drawn uniformly from 2..12 (the last class may be 2..13)."""
    sizes: list[int] = []
    while sum(sizes) < num_items:
        sizes.append(int(torch.randint(2, 13, (1,), generator=generator)))
    sizes[-1] -= sum(sizes) - num_items
    if sizes[-1] < 2 and len(sizes) > 1:
        sizes[-2] += sizes.pop()
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def clustered_embeddings(labels: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``(N, dim)`` L2-normalised embeddings: class centre + ``NOISE_SCALE`` Gaussian noise."""
    centres = torch.randn(int(labels.max()) + 1, dim, generator=generator)
    embeddings = torch.randn(len(labels), dim, generator=generator).mul_(NOISE_SCALE).add_(centres[labels])
    return embeddings.div_(embeddings.norm(dim=1, keepdim=True))


def machine_name(device: str) -> str:
    """Short description of the hardware that runs the search."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def run(num_items: int, dim: int, device: str, backend: str, chunk_size: int, seed: int) -> str:
    """Time one evaluation and return its markdown row."""
    generator = torch.Generator().manual_seed(seed)
    labels = sop_like_labels(num_items, generator)
    embeddings = clustered_embeddings(labels, dim, generator).to(device)
    start = time.perf_counter()
    metrics = retrieval_metrics(embeddings, labels, chunk_size=chunk_size, backend=backend, progress=True)
    seconds = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (
        f"| {machine_name(device)} | {num_items} | {dim} | {backend} | {device} | {chunk_size} | {seconds:.1f} "
        f"| {peak_rss_mb:.0f} | {metrics['recall@1']:.4f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60000, help="number of embeddings (queries = references)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument(
        "--device", choices=("all", "cpu", "cuda"), default="all", help="all: cpu, then cuda when available"
    )
    parser.add_argument("--backend", choices=("torch", "faiss"), default="torch")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="queries per matrix product")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--header", action="store_true", help="print the markdown table header first")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [device for device in devices if device == "cpu" or torch.cuda.is_available()]
    if args.header:
        print(HEADER)
    for device in devices:
        print(run(args.n, args.dim, device, args.backend, args.chunk_size, args.seed), flush=True)


if __name__ == "__main__":
    main()
