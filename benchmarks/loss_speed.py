"""RS@k forward+backward time and peak extra memory, beside the compute floor, with and without SiMix.

Each (implementation, N) runs in a fresh subprocess so that its peak memory is its own: peak RSS growth on the
CPU, ``torch.cuda.max_memory_allocated`` growth on a GPU. Inputs: N L2-normalised d-dim embeddings, 4 samples
per class in contiguous groups (the layout the authors' code requires), ``rank_includes_query=True`` so that all
implementations compute the authors' values, which are printed side by side. ``--embeddings`` picks them:

- ``random`` (default): independent random directions, as at the start of training: nearly every positive ranks
  far down the batch, so most pairs have an exactly zero gradient, which recallk skips;
- ``trained``: each class a random centre plus noise twice its length (re-normalised), like a model in
  training: 99% of positives rank in the top 100 and the loss is about 0.4, so nearly every pair has a
  gradient and nothing is skipped;
- a ``.pt`` file holding ``{"embeddings": (N, d), "labels": (N,)}`` with 4 per class in contiguous groups, e.g.
  a real model's embeddings written by ``benchmarks/loss_in_training.py`` (``--sizes`` and ``--dim`` then come
  from the file).

Implementations:

- ``recallk`` / ``recallk_simix``: RecallAtKLoss (query-chunked), without / with SiMix over all same-class pairs
  (N + 1.5 N items), with the device's default walk (``sync_free``: compact on the CPU, sync-free elsewhere);
- ``compact_`` / ``sync_free_`` / ``graph_`` before ``recallk``, ``recallk_simix``, ``smooth_ap`` or ``fast_ap``:
  the same loss with that walk forced (``sync_free=False`` / ``True`` / ``True`` and ``cuda_graph=True``, CUDA
  only: the walk replayed from a CUDA graph captured in the untimed first call), to compare them in one run;
- ``floor`` / ``floor_simix``: the two matrix products every implementation needs, E R^T and G R with G of the
  same size (N x N x d each; (2.5 N)^2 x d with SiMix), done in row chunks of 256 so that they fit at any N;
- ``naive``: the whole N x P x N tensor of (query, positive, item) triples under autograd;
- ``loop``: one query at a time, as in the authors' code;
- ``baseline`` / ``baseline_simix`` / ``baseline_smooth_ap`` / ``baseline_fast_ap``: the same losses from another
  source tree (``--baseline-src DIR/src``), e.g. an older recallk, for before/after tables;
- ``smooth_ap`` / ``fast_ap``: recallk's SmoothAPLoss (temperature 0.01) and FastAPLoss (10 bins) on the same
  chunked kernel; ``pml_smooth_ap`` / ``pml_fast_ap``: pytorch-metric-learning's (N x N x N and N x N x bins
  tensors, so only up to ``--pml-max-n``; PML 2.9's SmoothAPLoss also groups the batch wrongly, see BENCHMARKS.md,
  it is timed here only for its cost).

    python benchmarks/loss_speed.py                       # CPU, N in 1024 ... 32768
    python benchmarks/loss_speed.py --device cuda --sizes 4096 16384 65536
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

K = (1, 2, 4, 8, 16)
TAU_RANK, TAU_K = 0.01, 1.0
FLOOR_CHUNK = 256


LOSS_OPTIONS: dict[str, int] = {}  # extra RecallAtKLoss arguments (``--query-chunk``)


# implementation prefix -> the walk's options (recallk.losses.chunked_walk, recallk.losses.walk_graph)
WALKS = {"compact_": {"sync_free": False}, "sync_free_": {"sync_free": True},
         "graph_": {"sync_free": True, "cuda_graph": True}}
_MADE: dict[tuple, torch.nn.Module] = {}  # one loss object per process and settings: a CUDA graph is kept


def made(key: tuple, make) -> torch.nn.Module:
    """The loss ``make()`` built once for ``key``."""
    if key not in _MADE:
        _MADE[key] = make()
    return _MADE[key]


def recallk_loss(emb: torch.Tensor, labels: torch.Tensor, simix: bool = False, **walk: bool) -> torch.Tensor:
    from recallk import RecallAtKLoss, SimilarityMixup  # from --baseline-src when that is first on sys.path

    mixup = SimilarityMixup(pairs_per_class=None) if simix else None  # every same-class pair
    # tau_k=1 (the authors' code since 2024-11), so that the value equals the loop's
    loss = made(("recallk", simix, *sorted(walk.items())), lambda: RecallAtKLoss(
        k=K, tau_k=1.0, rank_includes_query=True, mixup=mixup, **LOSS_OPTIONS, **walk))
    return loss(emb, labels)


def ap_loss(emb: torch.Tensor, labels: torch.Tensor, name: str, **walk: bool) -> torch.Tensor:
    """recallk's (``smooth_ap``, ``fast_ap``) or pytorch-metric-learning's (``pml_`` prefix) AP surrogate."""
    from pytorch_metric_learning import losses as pml_losses

    from recallk import FastAPLoss, SmoothAPLoss

    make = {"smooth_ap": lambda: SmoothAPLoss(temperature=0.01, **LOSS_OPTIONS, **walk),
            "fast_ap": lambda: FastAPLoss(num_bins=10, **LOSS_OPTIONS, **walk),
            "pml_smooth_ap": lambda: pml_losses.SmoothAPLoss(temperature=0.01),
            "pml_fast_ap": lambda: pml_losses.FastAPLoss(num_bins=10)}[name]
    return made((name, *sorted(walk.items())), make)(emb, labels)


def two_products(emb: torch.Tensor, labels: torch.Tensor, simix: bool = False) -> torch.Tensor:
    """The compute floor: S = E E^T and G E (G of S's size), chunk by chunk; E is (2.5 N) x d with SiMix."""
    items = torch.cat([emb, emb, emb[: len(emb) // 2]]) if simix else emb
    with torch.no_grad():
        grad = torch.empty_like(items)
        total = items.new_zeros(())
        for start in range(0, len(items), FLOOR_CHUNK):
            sim = items[start : start + FLOOR_CHUNK] @ items.T
            grad[start : start + FLOOR_CHUNK] = sim @ items
            total += sim[0, 0]
    return (emb * grad[: len(emb)]).sum() * 0.0 + total


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


IMPLEMENTATIONS = {
    "floor": two_products,
    "recallk": recallk_loss,
    "baseline": recallk_loss,
    "floor_simix": lambda e, y: two_products(e, y, simix=True),
    "recallk_simix": lambda e, y: recallk_loss(e, y, simix=True),
    "baseline_simix": lambda e, y: recallk_loss(e, y, simix=True),
    "naive": naive_vectorised,
    "loop": per_query_loop,
    **{name: (lambda e, y, name=name: ap_loss(e, y, name))
       for name in ("smooth_ap", "fast_ap", "pml_smooth_ap", "pml_fast_ap")},
    **{f"baseline_{name}": (lambda e, y, name=name: ap_loss(e, y, name)) for name in ("smooth_ap", "fast_ap")},
    **{f"{prefix}{name}": make for prefix, walk in WALKS.items() for name, make in (
        ("recallk", lambda e, y, w=walk: recallk_loss(e, y, **w)),
        ("recallk_simix", lambda e, y, w=walk: recallk_loss(e, y, simix=True, **w)),
        ("smooth_ap", lambda e, y, w=walk: ap_loss(e, y, "smooth_ap", **w)),
        ("fast_ap", lambda e, y, w=walk: ap_loss(e, y, "fast_ap", **w)))},
}
PML_MAX_N = {"pml_smooth_ap": 512, "pml_fast_ap": 4096}  # defaults of --pml-max-n (memory N^3 and N^2 x bins)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def embeddings(kind: str, n: int, dim: int) -> torch.Tensor:
    """N unit vectors, 4 per class in contiguous groups: ``random`` directions, ``trained``-like clusters or
    the embeddings of a ``.pt`` file."""
    if kind not in ("random", "trained"):
        return torch.load(kind)["embeddings"].float()
    gen = torch.Generator().manual_seed(0)
    if kind == "random":
        return F.normalize(torch.randn(n, dim, generator=gen), dim=1)
    centres = F.normalize(torch.randn(n // 4, dim, generator=gen), dim=1).repeat_interleave(4, 0)
    return F.normalize(centres + 2.0 * torch.randn(n, dim, generator=gen) / dim**0.5, dim=1)


def measure(impl: str, n: int, dim: int, device: str, repeats: int, kind: str = "random") -> dict:
    """Time and peak memory of one implementation at one size (run in its own process)."""
    base = embeddings(kind, n, dim).to(device)
    labels = torch.arange(n // 4).repeat_interleave(4).to(device)
    fn = IMPLEMENTATIONS[impl]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times, value = [], float("nan")
    import pytorch_metric_learning.losses  # noqa: F401  imported before the memory is read, for every impl

    import recallk  # noqa: F401  (from --baseline-src for the baseline rows)

    rss_before = rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated()
    warm_up = n <= 4096 or device.startswith("cuda")  # a GPU's first call loads kernels and libraries
    for _ in range(repeats + warm_up):
        emb = base.clone().requires_grad_()
        sync()
        start = time.perf_counter()
        torch.manual_seed(0)  # the same SiMix draw for every implementation
        loss = fn(emb, labels)
        loss.backward()
        sync()
        times.append(time.perf_counter() - start)
        value = loss.item()
        del emb, loss
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - mem_before) / 2**20
    else:
        peak = rss_mb() - rss_before
    return {"impl": impl, "n": n, "seconds": min(times[warm_up:]), "peak_mb": peak, "loss": value}


def run_isolated(impl: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--single", impl, str(n), "--dim", str(args.dim), "--device", args.device,
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--embeddings", args.embeddings]
    if impl.startswith("baseline"):
        cmd += ["--baseline-src", args.baseline_src]
    if args.query_chunk:
        cmd += ["--query-chunk", str(args.query_chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1:] or [f"killed (exit code {out.returncode})"]
        reason = "out of memory" if "out of memory" in out.stderr.lower() else last[0]
        return {"impl": impl, "n": n, "error": reason}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--embeddings", default="random",
                        help="random (directions: most gradients exactly zero), trained (clusters) or a .pt file")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per point (the fastest is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each measuring process (CPU)")
    default_impls = ["floor", "recallk", "floor_simix", "recallk_simix", "naive", "loop"]
    parser.add_argument("--impls", nargs="+", default=default_impls, choices=list(IMPLEMENTATIONS))
    parser.add_argument("--small-max-n", type=int, default=4096, help="skip naive and loop above this N")
    parser.add_argument("--simix-max-n", type=int, default=8192, help="skip the SiMix rows above this N")
    parser.add_argument("--baseline-max-n", type=int, default=16384, help="skip the baseline rows above this N")
    parser.add_argument("--baseline-src", help="a source directory holding another recallk package (baseline rows)")
    parser.add_argument("--query-chunk", type=int, help="RecallAtKLoss(query_chunk=...) (default: the library's)")
    parser.add_argument("--pml-max-n", type=int, nargs=2, metavar=("SMOOTH_AP", "FAST_AP"),
                        default=[PML_MAX_N["pml_smooth_ap"], PML_MAX_N["pml_fast_ap"]],
                        help="skip PML's Smooth-AP / FastAP above these N")
    parser.add_argument("--single", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        torch.set_num_threads(args.threads)
        if args.single[0].startswith("baseline"):
            sys.path.insert(0, args.baseline_src)
        impl, n = args.single[0], int(args.single[1])
        if args.query_chunk:
            LOSS_OPTIONS["query_chunk"] = args.query_chunk
        print(json.dumps(measure(impl, n, args.dim, args.device, args.repeats, args.embeddings)))
        return
    if args.embeddings not in ("random", "trained"):
        held = torch.load(args.embeddings)
        args.sizes, args.dim = [len(held["embeddings"])], held["embeddings"].shape[1]
        if not torch.equal(held["labels"], torch.arange(args.sizes[0] // 4).repeat_interleave(4)):
            parser.error(f"{args.embeddings}: labels must be 4 per class in contiguous groups (0 0 0 0 1 1 1 1 ...)")
    if any(i.startswith("baseline") for i in args.impls) and not args.baseline_src:
        parser.error("the baseline rows need --baseline-src DIR (a directory holding a recallk package)")
    cpu = f"{platform.processor() or platform.machine()}, {args.threads} threads"
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    print(f"Loss forward+backward, {args.embeddings} embeddings, d={args.dim}, 4 samples/class, "
          f"{args.device} ({machine}), "
          f"torch {torch.__version__}, "
          f"{datetime.date.today()}; command: python benchmarks/loss_speed.py {' '.join(sys.argv[1:])}\n")
    print("| N | implementation | time (s) | x floor | peak extra memory (MiB) | loss |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        floors: dict[str, float] = {}
        for impl in args.impls:
            simix = impl.endswith("simix")
            if (impl in ("naive", "loop") and n > args.small_max_n) or (simix and n > args.simix_max_n):
                continue
            if impl.startswith("baseline") and n > args.baseline_max_n:
                continue
            if impl.startswith("pml_") and n > args.pml_max_n[impl == "pml_fast_ap"]:
                continue
            r = run_isolated(impl, n, args)
            if "error" in r:
                print(f"| {n} | {impl} | - | - | {r['error']} | - |", flush=True)
                continue
            if impl.startswith("floor"):
                floors["simix" if simix else "plain"] = r["seconds"]
            floor = floors.get("simix" if simix else "plain")
            ratio = f"{r['seconds'] / floor:.2f}" if floor and not impl.startswith("floor") else "-"
            loss = "-" if impl.startswith("floor") else f"{r['loss']:.6f}"
            print(f"| {n} | {impl} | {r['seconds']:.3f} | {ratio} | {r['peak_mb']:.0f} | {loss} |", flush=True)


if __name__ == "__main__":
    main()
