"""torchrun + DDP with 2 and 3 processes (gloo, CPU): the distributed multistage step equals a single-process step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recallk.engine.distributed import (
    all_gather_rows,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    leave_process_group,
)

import ddp_worker
from run_fixtures import free_port

WORKER = Path(__file__).with_name("ddp_worker.py")


def run_workers(out_dir: Path, world_size: int) -> Path:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={world_size}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER), str(out_dir),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return out_dir


@pytest.fixture(scope="module")
def worker_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_workers(tmp_path_factory.mktemp("ddp2"), 2)


@pytest.fixture(scope="module")
def three_worker_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_workers(tmp_path_factory.mktemp("ddp3"), 3)


CASES = [(w, name) for w, scenarios in sorted(ddp_worker.SCENARIOS.items()) for name in sorted(scenarios)]


def outputs_for(world_size: int, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("worker_outputs" if world_size == 2 else "three_worker_outputs")


@pytest.mark.parametrize("world_size, scenario", CASES)
def test_ddp_gradient_equals_single_process_gradient(world_size: int, scenario: str, request) -> None:
    """Sharded RS@k (with and without SiMix, uneven rows) and the rank-0 path equal one process (float64)."""
    out_dir = outputs_for(world_size, request)
    expected = ddp_worker.single_process_step(ddp_worker.SCENARIOS[world_size][scenario][1])
    for rank in range(world_size):
        result = torch.load(out_dir / f"{scenario}_rank{rank}.pt")
        assert float(result["loss"]) == pytest.approx(float(expected["loss"]), rel=1e-12)
        for actual, reference in zip(result["grads"], expected["grads"], strict=True):
            torch.testing.assert_close(actual, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("world_size, scenario", CASES)
def test_parameters_identical_across_ranks_after_step(world_size: int, scenario: str, request) -> None:
    out_dir = outputs_for(world_size, request)
    params = [torch.load(out_dir / f"{scenario}_rank{rank}.pt")["params"] for rank in range(world_size)]
    expected = ddp_worker.single_process_step(ddp_worker.SCENARIOS[world_size][scenario][1])["params"]
    for per_rank, reference in zip(zip(*params), expected, strict=True):
        for p in per_rank:
            assert torch.equal(p, per_rank[0])
        torch.testing.assert_close(per_rank[0], reference, rtol=1e-9, atol=1e-12)


def test_all_gather_rows_with_uneven_rows(worker_outputs: Path) -> None:
    ranks = [torch.load(worker_outputs / f"gather_rank{rank}.pt") for rank in (0, 1)]
    expected_rows = torch.cat([torch.full((2, 3), 0.0), torch.full((3, 3), 1.0)]).double()
    for result in ranks:
        assert torch.equal(result["gathered"], expected_rows) and result["counts"] == [2, 3]


def test_single_process_helpers_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = init_distributed()
    assert (context.rank, context.world_size, context.backend) == (0, 1, None) and context.is_main
    assert (get_rank(), get_world_size(), is_distributed()) == (0, 1, False)
    rows = torch.randn(4, 2, requires_grad=True)
    gathered, counts = all_gather_rows(rows)
    assert counts == [4] and torch.equal(gathered, rows) and not gathered.requires_grad


def test_init_distributed_explains_missing_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        init_distributed()
    with pytest.raises(ValueError, match="backend"):
        init_distributed("mpi")


def test_ranks_leave_by_meeting_in_the_store_without_a_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    """A collective as the last operation can abort a slower rank at exit (gloo); leaving meets in the store."""
    from datetime import timedelta

    store = torch.distributed.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=timedelta(seconds=60))

    def no_collective(*args: object, **kwargs: object) -> None:
        raise AssertionError("leave_process_group ran a collective")

    monkeypatch.setattr(torch.distributed, "barrier", no_collective)
    for leave in (1, 2):  # every leave of a process has keys of its own
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
        group_store = torch.distributed.distributed_c10d._get_default_store()
        leave_process_group()
        assert not torch.distributed.is_initialized()
        assert group_store.add(f"recallk/leave/{leave}", 0) == 1
