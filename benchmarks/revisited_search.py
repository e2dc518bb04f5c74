"""Time and memory of the Revisited Oxford protocol over a database with a million distractors (R1M-shaped).

Synthetic, ROxf-shaped: 70 queries, a 4,993-image database and ``--distractors`` extra images, unit-norm random
descriptors of ``--dim`` dimensions; each query has 20 easy, 20 hard and 10 junk images. Distractor descriptors are
generated chunk by chunk (as ``recallk evaluate --distractors`` produces them while embedding), scored and dropped
by :func:`recallk.evaluation.revisited.search_metrics`. Prints one markdown row:

    | machine | queries | database | distractors | d | chunk | seconds | peak RSS MB | held database would be MB |

Usage: python benchmarks/revisited_search.py [--distractors 1000000] [--dim 512] [--chunk 65536] [--header]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from recallk.evaluation.revisited import search_metrics

QUERIES, DATABASE = 70, 4993


def distractor_chunks(count: int, dim: int, chunk: int, seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, count, chunk):
        yield F.normalize(torch.randn(min(chunk, count - start), dim, generator=generator), dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distractors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=65536)
    parser.add_argument("--header", action="store_true")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(QUERIES, args.dim, generator=generator), dim=1)
    database = F.normalize(torch.randn(DATABASE, args.dim, generator=generator), dim=1)
    gnd = []
    for _ in range(QUERIES):
        items = torch.randperm(DATABASE, generator=generator)
        gnd.append({"easy": items[:20].numpy(), "hard": items[20:40].numpy(), "junk": items[40:50].numpy()})
    start = time.perf_counter()
    result = search_metrics(queries, database, gnd, distractor_chunks(args.distractors, args.dim, args.chunk, 1),
                            chunk_size=args.chunk)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    held_mb = (DATABASE + args.distractors) * args.dim * 4 / 2**20
    if args.header:
        print("| machine | queries | database | distractors | d | chunk | seconds | peak RSS MB "
              "| held database would be MB |")
        print("|---|---|---|---|---|---|---|---|---|")
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"| {machine} | {QUERIES} | {DATABASE} | {args.distractors} | {args.dim} | {args.chunk} | {seconds:.1f} "
          f"| {peak_mb:.0f} | {held_mb:.0f} |")
    assert 0 <= result["medium"]["map"] <= 1


if __name__ == "__main__":
    main()
