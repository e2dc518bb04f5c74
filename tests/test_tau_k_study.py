"""Issue 30's tools: per-k recall temperatures in the config, the annealed tau_k, and the positive-pair census."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recallk import RecallAtKLoss, SmoothAPLoss
from recallk.config import load_config
from recallk.errors import ConfigError
from recallk.losses.census import positive_pair_census, positive_ranks
from recallk.losses.factory import build_loss
from recallk.losses.temperature_schedule import TauKAnnealing
from recallk.training.assemble import build_loss_from_config

from data_fixtures import make_glyph_folder
from run_fixtures import tiny_config

RECIPE = Path(__file__).resolve().parents[1] / "src" / "recallk" / "configs" / "omniglot.yaml"


def unit(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_config_takes_one_tau_k_per_k_like_the_library() -> None:
    cfg = load_config(RECIPE, ["loss.tau_k=[1,2,4,8,16]"])
    assert cfg.loss.tau_k == (1.0, 2.0, 4.0, 8.0, 16.0)
    loss = build_loss_from_config(cfg, num_classes=None)
    assert loss.tau_k == (1.0, 2.0, 4.0, 8.0, 16.0)
    assert load_config(RECIPE, ["loss.tau_k=2"]).loss.tau_k == 2.0


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss.tau_k=[1,2]"], "'loss.tau_k' has 2 values for the 5 values of loss.k"),
    (["loss.tau_k=[1,2,0,8,16]"], "'loss.tau_k' must be > 0"),
    (["loss.name=smooth_ap", "loss.tau_k_start=256"], "'loss.tau_k_start' anneals RS@k's tau_k"),
    (["loss.tau_k_start=0"], "'loss.tau_k_start' must be > 0"),
    (["loss.name=triplet", "output.census_every=5"], "'output.census_every' censuses recallk's ranking losses"),
])
def test_bad_temperature_settings_are_one_line(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(RECIPE, overrides)
    assert "\n" not in str(err.value)


def test_annealing_is_geometric_per_k_and_ends_at_the_loss_temperature() -> None:
    loss = RecallAtKLoss(k=(1, 4), tau_k=(1.0, 4.0))
    schedule = TauKAnnealing(loss, start=1024.0, steps=10)
    assert schedule.set_step(0) == pytest.approx((1024.0, 1024.0))
    assert loss.tau_k == pytest.approx((1024.0, 1024.0))
    assert schedule.value(5) == pytest.approx((math.sqrt(1024.0), math.sqrt(1024.0 * 4.0)))
    assert schedule.value(10) == (1.0, 4.0) and schedule.value(500) == (1.0, 4.0)
    # it depends on the step only: a resumed run gets the same value
    assert TauKAnnealing(RecallAtKLoss(k=(1, 4), tau_k=(1.0, 4.0)), 1024.0, 10).value(7) == schedule.value(7)


def test_annealing_refuses_other_losses() -> None:
    with pytest.raises(ValueError, match="applies to RS@k"):
        TauKAnnealing(SmoothAPLoss(), 100.0, 5)


def test_annealing_reaches_the_rs_at_k_inside_a_memory() -> None:
    memory = build_loss("rsk", memory_size=8, embed_dim=4)
    TauKAnnealing(memory, 50.0, 4).set_step(0)
    assert memory.loss.tau_k == (50.0,) * 5


def test_positive_ranks_match_counting() -> None:
    emb, labels = unit(20, seed=1), torch.arange(5).repeat(4)
    sim = emb @ emb.T
    expected = []
    for q in range(20):
        for x in range(20):
            if x != q and labels[x] == labels[q]:
                expected.append(1 + sum(1 for z in range(20) if z != q and sim[q, z] > sim[q, x]))
    assert positive_ranks(sim, labels, chunk=3).tolist() == expected


def test_census_sees_the_plateau_that_a_large_tau_k_removes() -> None:
    """Positives ranked far beyond k have no RS@k gradient at tau_k = 1, and every one has one at tau_k = N."""
    n = 512
    emb, labels = unit(n, d=32, seed=2), torch.arange(n // 4).repeat_interleave(4)
    cold = positive_pair_census(RecallAtKLoss(tau_k=1.0), emb, labels)
    warm = positive_pair_census(RecallAtKLoss(tau_k=float(n)), emb, labels)
    assert cold["pairs"] == warm["pairs"] == n * 3
    assert cold["mean_rank"] == warm["mean_rank"] > 100  # random embeddings: positives rank mid-database
    assert cold["pairs_with_gradient"] < 0.2
    assert warm["pairs_with_gradient"] > 0.99  # (a positive with no near-tied neighbour has dr/ds ~ 0 anyway)
    smooth_ap = positive_pair_census(SmoothAPLoss(), emb, labels)
    assert 0.0 <= smooth_ap["pairs_with_gradient"] <= 1.0 and smooth_ap["loss"] > 0.5


def test_census_leaves_simix_on_the_loss() -> None:
    from recallk import SimilarityMixup

    loss = RecallAtKLoss(mixup=SimilarityMixup())
    positive_pair_census(loss, unit(16), torch.arange(4).repeat(4))
    assert loss.mixup is not None


def test_training_writes_the_census_with_the_annealed_temperature(tmp_path) -> None:
    """A real (tiny) training run: census rows at step 0 and every 2 steps, with the annealed tau_k of each step;
    a resumed run drops the rows of the steps it redoes, so its census equals an uninterrupted run's."""
    from recallk.training.trainer import train

    data = make_glyph_folder(tmp_path / "glyphs")
    settings = {"loss__tau_k": 1.0, "loss__tau_k_start": 16.0, "loss__tau_k_anneal_epochs": 1.0,
                "output__census_every": 2,
                "output__plots": False, "output__export_embeddings": False}
    train(tiny_config(tmp_path, **settings), tmp_path / "full", data_dir=data, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "full" / "census.jsonl").read_text().splitlines()]
    steps_per_epoch = 72 // 16
    assert [r["step"] for r in rows] == list(range(0, 3 * steps_per_epoch, 2))
    assert rows[0]["tau_k"] == [16.0] * 3 and rows[-1]["tau_k"] == [1.0] * 3
    assert 1.0 < rows[1]["tau_k"][0] < 16.0
    assert all(r["pairs"] == 16 and 0.0 <= r["pairs_with_gradient"] <= 1.0 for r in rows)

    (tmp_path / "part").mkdir()
    run = tmp_path / "part" / "run"
    train(tiny_config(tmp_path, **settings, train__max_steps=5), run, data_dir=data, progress=False)
    from recallk.training.run_dir import RunDirectory

    with RunDirectory(run, resume=True) as directory:  # as if killed after the checkpoint of step 3
        directory.truncate_census(2)
    assert [json.loads(line)["step"] for line in (run / "census.jsonl").read_text().splitlines()] == [0, 2]


def test_tau_k_equal_to_k_is_spelled_k_in_the_library_and_the_config() -> None:
    assert RecallAtKLoss(k=(1, 4, 16), tau_k="k").tau_k == (1.0, 4.0, 16.0)
    cfg = load_config(RECIPE, ["loss.tau_k=k", "loss.k=[1,2,4]"])
    assert cfg.loss.tau_k == "k" and build_loss_from_config(cfg, num_classes=None).tau_k == (1.0, 2.0, 4.0)
    with pytest.raises(ValueError, match="or 'k'"):
        RecallAtKLoss(tau_k="q")
    with pytest.raises(ConfigError, match="loss.tau_k"):
        load_config(RECIPE, ["loss.tau_k=q"])


def test_plateau_warning_names_the_share_the_ranks_and_the_fix() -> None:
    from recallk.training.health import plateau_warning

    flat, k = {"pairs_with_gradient": 0.001, "mean_rank": 1115.3}, (1, 2, 4, 8, 16)
    message = plateau_warning(flat, 4096, k, (1.0,) * 5)
    assert message is not None and "\n" not in message
    assert "0.1 % of the (query, positive) pairs" in message and "rank 1,115 of 4,095" in message
    assert "loss.tau_k_start=4096" in message and "loss.tau_k=k" in message
    assert plateau_warning({"pairs_with_gradient": 0.2, "mean_rank": 30.0}, 256, k, (1.0,) * 5) is None
    assert plateau_warning(flat, 4096, k, (1.0, 2.0, 4.0, 8.0, 16.0)) is None  # tau_k = k escapes the plateau


def test_training_warns_once_when_rs_at_k_starts_on_its_plateau(tmp_path, caplog) -> None:
    """A temperature so small that no positive is within reach of k: the first batch is all plateau."""
    from recallk.training.trainer import train

    data = make_glyph_folder(tmp_path / "glyphs")
    settings = {"loss__tau_k": 1e-4, "train__max_steps": 2, "output__plots": False, "output__export_embeddings": False}
    with caplog.at_level("WARNING", logger="recallk"):
        train(tiny_config(tmp_path, **settings), tmp_path / "flat", data_dir=data, progress=False)
    warnings = [r.getMessage() for r in caplog.records if "gradient plateau" in r.getMessage()]
    assert len(warnings) == 1 and "loss.tau_k_start=16" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="recallk"):  # annealing is the fix: no warning
        train(tiny_config(tmp_path, **settings, loss__tau_k_start=16.0), tmp_path / "annealed", data_dir=data,
              progress=False)
    assert not [r for r in caplog.records if "gradient plateau" in r.getMessage()]
