"""Whitening: the two fits do what their formulas promise, and the layer travels with the model everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import recallk
from recallk.models import create_model
from recallk.models.export import export_network, load_exported
from recallk.models.whitening import Whitening, learn_whitening, pca_whitening


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return torch.randn(n, d, generator=generator, dtype=torch.float64) @ mixing + 3.0


def test_learned_whitening_makes_the_pair_scatter_the_identity() -> None:
    x = correlated(200, 6)
    pairs = torch.stack([torch.arange(0, 200, 2), torch.arange(1, 200, 2)], dim=1)
    x[pairs[:, 1]] = x[pairs[:, 0]] + 0.1 * correlated(100, 6, seed=1)  # positives near their queries
    layer = learn_whitening(x, pairs)
    projection, mean = layer.projection.double(), layer.mean.double()
    assert torch.allclose(mean, x[pairs[:, 0]].mean(0).float().double(), atol=1e-5)  # centred on the queries' mean
    difference = (x[pairs[:, 0]] - x[pairs[:, 1]]) @ projection.t()
    scatter = difference.t() @ difference / len(difference)
    assert torch.allclose(scatter, torch.eye(6, dtype=torch.float64), atol=1e-4)
    # the rotation orders the whitened (inter) scatter: diagonal with decreasing variances
    spread = (x - mean) @ projection.t()
    inter = spread.t() @ spread
    assert torch.allclose(inter, torch.diag(torch.diagonal(inter)), atol=1e-3 * inter.abs().max())
    assert torch.all(torch.diagonal(inter)[:-1] >= torch.diagonal(inter)[1:])
    reduced = learn_whitening(x, pairs, dim=3)
    assert reduced.projection.shape == (3, 6) and reduced(x.float()).shape == (200, 3)
    assert torch.allclose(reduced.projection, layer.projection[:3])
    out = reduced(x.float())
    assert torch.allclose(out.norm(dim=1), torch.ones(200), atol=1e-5)


def test_learned_whitening_refuses_too_few_pairs() -> None:
    x = correlated(10, 8)
    with pytest.raises(ValueError, match="intra-pair scatter .* singular"):
        learn_whitening(x, torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match="pair indices must be in 0..9"):
        learn_whitening(x, torch.tensor([[0, 10]]))


@pytest.mark.parametrize("power", [0.5, 0.25])
def test_pca_whitening_decorrelates_with_the_power(power: float) -> None:
    x = correlated(500, 5)
    layer = pca_whitening(x, power=power)
    y = (x - layer.mean.double()) @ layer.projection.double().t()
    covariance = y.t() @ y / (len(y) - 1)
    assert torch.allclose(covariance, torch.diag(torch.diagonal(covariance)), atol=1e-4 * covariance.abs().max())
    eigenvalues = torch.linalg.eigvalsh(torch.cov(x.t())).flip(0)
    assert torch.allclose(torch.diagonal(covariance), eigenvalues.pow(1 - 2 * power), rtol=1e-3)
    reduced = pca_whitening(x, dim=2, power=power)
    assert reduced.projection.shape == (2, 5) and reduced(x.float()).shape == (500, 2)
    with pytest.raises(ValueError, match=r"dimension must be in 1..5"):
        pca_whitening(x, dim=6)


def test_pca_whitening_refuses_directions_the_descriptors_lack() -> None:
    with pytest.raises(ValueError, match="to 8 dimensions needs descriptors that vary in 8 directions, but these 5 "
                                         "span only 4; fit on more images than dimensions"):
        pca_whitening(correlated(5, 8))  # 5 points span 4 directions: the other 4 would be scaled by 3e4
    assert pca_whitening(correlated(5, 8), dim=4).projection.abs().max() < 1e3
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(50, 3, generator=generator, dtype=torch.float64) @ torch.randn(3, 8, generator=generator,
                                                                                     dtype=torch.float64)
    with pytest.raises(ValueError, match="but these 50 span only 3"):  # many images, but of 3 directions only
        pca_whitening(flat, dim=5)


def test_whitened_model_is_saved_loaded_and_exported_with_its_whitening(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_model("omniglot_cnn", embed_dim=8, widths=(16,), pooling="gem").eval()
    images = torch.rand(40, 1, 12, 12)
    with torch.no_grad():
        plain = net(images)
        whitening = pca_whitening(plain, dim=5, power=0.25)
        net.set_whitening(whitening)
        expected = net(images)
    assert expected.shape == (40, 5) and net.embed_dim == 5
    assert torch.allclose(expected, whitening(plain), atol=1e-6)
    assert not torch.allclose(expected[:, :5], plain[:, :5], atol=1e-2)

    rebuilt = create_model("omniglot_cnn", embed_dim=8, widths=(16,), pooling="gem", whitening="pca", whitening_dim=5)
    rebuilt.load_state_dict(net.state_dict())  # a checkpoint's state dict carries the whitening buffers
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(images), expected, atol=1e-6)
    # TorchScript runs the same module graph as ONNX export (tests/test_export.py checks that both match eager)
    path = export_network(net, images[:4], tmp_path / "net.pt", "torchscript")
    difference = (load_exported(path, "torchscript")(images[:3]) - expected[:3]).abs().max()
    assert difference <= 1e-5, difference


def test_whitening_layer_checks_its_input_size() -> None:
    net = create_model("omniglot_cnn", embed_dim=8, widths=(4,))
    with pytest.raises(ValueError, match="whitening takes 6-d descriptors but the head gives 8"):
        net.set_whitening(Whitening(6))
    with pytest.raises(recallk.errors.RecallkUsageError, match="unknown whitening 'zca'"):
        create_model("omniglot_cnn", embed_dim=8, widths=(4,), whitening="zca")


def test_gem_exponent_gets_its_own_rate_and_no_weight_decay(tmp_path: Path) -> None:
    from recallk.models.heads import with_gem_group
    from recallk.training.trainer import Trainer

    from data_fixtures import make_glyph_folder
    from run_fixtures import tiny_config

    model = create_model("omniglot_cnn", embed_dim=8, widths=(4,), pooling="gem")
    groups = with_gem_group(model, model.parameter_groups(lr=1e-3, weight_decay=4e-4), lr=1e-2)
    by_name = {g["name"]: g for g in groups}
    assert by_name["gem"]["params"] == [model.head.pool.p]
    assert by_name["gem"]["lr"] == 1e-2 and by_name["gem"]["weight_decay"] == 0.0
    assert all(p is not model.head.pool.p for p in by_name["head"]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    fixed = create_model("omniglot_cnn", embed_dim=8, widths=(4,), pooling="gem", gem_learnable=False)
    assert [g["name"] for g in with_gem_group(fixed, fixed.parameter_groups(lr=1e-3), 1e-2)] == ["backbone", "head"]

    data = make_glyph_folder(tmp_path / "data", classes=8, per_class=2, size=16)
    config = tiny_config(tmp_path, model__pooling="gem", optim__gem_lr_mult=10.0, optim__schedule="none")
    trainer = Trainer(config, tmp_path / "run", data_dir=data, progress=False)
    try:
        rates = {g["name"]: (g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups}
        assert rates["gem"] == pytest.approx((3e-2, 0.0)) and rates["head"][0] == pytest.approx(3e-3)
    finally:
        trainer.close()


def test_run_directory_resolves_to_a_whitening_of_its_own_weights(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from recallk.training.checkpoint import CheckpointError, save_checkpoint, weights_digest
    from recallk.training.evaluate_run import resolve_checkpoint

    def weights(seed: int) -> dict:
        torch.manual_seed(seed)
        return create_model("omniglot_cnn", embed_dim=4, widths=(4,)).state_dict()

    folder = tmp_path / "checkpoints"
    best, last, other = weights(0), weights(1), weights(2)
    save_checkpoint(folder / "best.pt", {"model": best})
    save_checkpoint(folder / "last.pt", {"model": last})
    (tmp_path / "summary.json").write_text("{}")
    assert resolve_checkpoint(tmp_path) == folder / "best.pt"
    whitened = {**best, "whitening.mean": torch.ones(4), "whitening.projection": torch.eye(4)}
    assert weights_digest(whitened) == weights_digest(best)  # the whitening's own buffers are not the weights
    for source in (best, last):  # fitted on either checkpoint of this run
        save_checkpoint(folder / "whitened.pt", {"model": whitened,
                                                 "whitening": {"source_weights": weights_digest(source)}})
        assert resolve_checkpoint(tmp_path) == folder / "whitened.pt"
    # another run's whitening (or one of weights that training has replaced since): refused in one line naming both
    save_checkpoint(folder / "whitened.pt", {"model": whitened, "whitening": {
        "source_weights": weights_digest(other), "source_checkpoint": "/elsewhere/checkpoints/best.pt"}})
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(tmp_path)
    message = str(error.value)
    assert "\n" not in message and f"weights {weights_digest(other)[:12]} of /elsewhere/checkpoints/best.pt" in message
    assert f"best.pt weights {weights_digest(best)[:12]}" in message and "recallk whiten" in message
    save_checkpoint(folder / "whitened.pt", {"model": whitened, "whitening": {"source_checkpoint": "x.pt"}})
    with pytest.raises(CheckpointError, match="no digest to check them by"):
        resolve_checkpoint(tmp_path)
    assert resolve_checkpoint(folder / "whitened.pt") == folder / "whitened.pt"  # a file given is used as it is

    (tmp_path / "summary.json").unlink()  # an interrupted run is named as unfinished
    (folder / "whitened.pt").unlink()
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint(tmp_path) == folder / "best.pt"
    assert "is unfinished" in caplog.text and f"recallk train --resume {tmp_path}" in caplog.text


def test_run_directory_without_a_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    from recallk.training.checkpoint import CheckpointError
    from recallk.training.evaluate_run import resolve_checkpoint

    with pytest.raises(CheckpointError, match="is not a run directory"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "config.yaml").write_text("{}")  # a run stopped before its first checkpoint
    with pytest.raises(CheckpointError, match=f"start it again with 'recallk train {tmp_path}/config.yaml --run-dir"):
        resolve_checkpoint(tmp_path)
