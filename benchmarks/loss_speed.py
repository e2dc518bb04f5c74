"""RS@k forward+backward time and peak memory: recallk vs a naive vectorised loss vs a per-query loop.

Each (implementation, N) runs in a fresh subprocess so that its peak memory is its own: peak RSS growth on the
CPU, ``torch.cuda.max_memory_allocated`` growth on a GPU. Inputs: N L2-normalised d-dim embeddings, 4 samples
per class in contiguous groups (the layout the authors' code requires), ``rank_includes_query=True`` so that all
three compute the authors' values, which are printed side by side.

    python benchmarks/loss_speed.py                       # CPU, N in 256 1024 4096
    python benchmarks/loss_speed.py --device cuda --sizes 256 1024 4096 16384
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

from recallk import RecallAtKLoss

K = (1, 2, 4, 8, 16)
TAU_RANK, TAU_K = 0.01, 1.0


def recallk_loss(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return RecallAtKLoss(k=K, rank_includes_query=True)(emb, labels)


def naive_vectorised(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The whole N x P x N tensor of (query, positive, item) triples under autograd."""
    n, per_class = len(emb), int((labels == labels[0]).sum())
    sim = emb @ emb.T
    group = torch.arange(n, device=emb.device) // per_class
    members = group[:, None] * per_class + torch.arange(per_class, device=emb.device)  # N x m, includes q
    pos_sim = sim.gather(1, members)  # N x m
    diff = sim[:, None, :] - pos_sim[:, :, None]  # N x m x N
    sig = torch.sigmoid(diff / TAU_RANK)
    not_x = torch.ones_like(sig).scatter_(2, members[:, :, None], 0.0)  # z != x
    ranks = 1.0 + (sig * not_x).sum(2)  # N x m
    k = torch.tensor(K, dtype=emb.dtype, device=emb.device).clamp(max=n)
    hits = torch.sigmoid((k - ranks[:, :, None]) / TAU_K)  # N x m x K
    is_self = members == torch.arange(n, device=emb.device)[:, None]
    hits = hits.masked_fill(is_self[:, :, None], 0.0)
    recall = torch.minimum(hits.sum(1), k) / k.clamp(max=per_class - 1)
    return 1.0 - recall.mean()


def per_query_loop(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One query at a time, as in the authors' code: a Python loop over the batch."""
    n, per_class = len(emb), int((labels == labels[0]).sum())
    k = torch.tensor(K, dtype=emb.dtype, device=emb.device).clamp(max=n)
    norm = k.clamp(max=per_class - 1)
    total = emb.new_zeros(())
    for q in range(n):
        start = (q // per_class) * per_class
        sim = emb[q] @ emb.T  # N
        pos = sim[start : start + per_class]  # m
        sig = torch.sigmoid((sim[:, None] - pos[None, :]) / TAU_RANK)  # N x m
        mask = torch.ones_like(sig)
        mask[start : start + per_class].fill_diagonal_(0.0)
        ranks = 1.0 + (sig * mask).sum(0)  # m
        hits = torch.sigmoid((k[None, :] - ranks[:, None]) / TAU_K)  # m x K
        hits = hits * (torch.arange(per_class, device=emb.device) != q - start)[:, None]
        total = total + (torch.minimum(hits.sum(0), k) / norm).mean()
    return 1.0 - total / n


IMPLEMENTATIONS = {"recallk": recallk_loss, "naive": naive_vectorised, "loop": per_query_loop}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(impl: str, n: int, dim: int, device: str, repeats: int) -> dict:
    """Time and peak memory of one implementation at one size (run in its own process)."""
    gen = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(n, dim, generator=gen), dim=1).to(device)
    labels = torch.arange(n // 4).repeat_interleave(4).to(device)
    fn = IMPLEMENTATIONS[impl]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times, value = [], float("nan")
    rss_before = rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated()
    for _ in range(repeats + 1):  # the first run warms up
        emb = base.clone().requires_grad_()
        sync()
        start = time.perf_counter()
        loss = fn(emb, labels)
        loss.backward()
        sync()
        times.append(time.perf_counter() - start)
        value = loss.item()
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - mem_before) / 2**20
    else:
        peak = rss_mb() - rss_before
    return {"impl": impl, "n": n, "seconds": min(times[1:]), "peak_mb": peak, "loss": value}


def run_isolated(impl: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--single", impl, str(n), "--dim", str(args.dim), "--device", args.device,
           "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        reason = "out of memory" if "out of memory" in out.stderr.lower() else out.stderr.strip().splitlines()[-1]
        return {"impl": impl, "n": n, "error": reason}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    parser.add_argument("--loop-max-n", type=int, default=4096, help="skip the per-query loop above this N")
    parser.add_argument("--single", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(measure(args.single[0], int(args.single[1]), args.dim, args.device, args.repeats)))
        return
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"Loss forward+backward, d={args.dim}, 4 samples/class, {args.device} ({machine}), torch {torch.__version__}, "
          f"{datetime.date.today()}; command: python benchmarks/loss_speed.py {' '.join(sys.argv[1:])}\n")
    print("| N | implementation | time (s) | peak memory (MiB) | loss | speed-up of recallk | memory of recallk |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        rows = [run_isolated(i, n, args) for i in args.impls if not (i == "loop" and n > args.loop_max_n)]
        ours = next((r for r in rows if r["impl"] == "recallk" and "error" not in r), None)
        for r in rows:
            if "error" in r:
                print(f"| {n} | {r['impl']} | - | {r['error']} | - | - | - |")
                continue
            speed = f"{r['seconds'] / ours['seconds']:.1f}x" if ours else "-"
            mem = f"{ours['peak_mb'] / r['peak_mb']:.2f}" if ours and r["peak_mb"] > 0 else "-"
            print(f"| {n} | {r['impl']} | {r['seconds']:.4f} | {r['peak_mb']:.0f} | {r['loss']:.6f} | {speed} | {mem} |",
                  flush=True)


if __name__ == "__main__":
    main()
