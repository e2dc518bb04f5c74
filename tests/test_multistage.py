"""Multistage backward gives the full-batch gradient; BatchNorm freezing."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from recallk.engine.batchnorm import batchnorm_layers_in_training_mode, freeze_batchnorm, is_frozen_batchnorm
from recallk.engine.multistage import multistage_backward
from recallk.losses.recall_at_k import RecallAtKLoss
from recallk.losses.simix import SimilarityMixup


def contrastive_loss(embeddings, labels, ref_emb=None, ref_labels=None, query_index=None, temperature=0.5):
    """Stand-in batch loss with RecallAtKLoss's signature: softmax over the database, mean log-prob of positives."""
    emb = F.normalize(embeddings, dim=1)
    ref = emb if ref_emb is None else F.normalize(ref_emb, dim=1)
    ref_labels = labels if ref_labels is None else ref_labels
    rows = torch.arange(len(emb))
    self_col = rows if ref_emb is None else query_index
    sim = emb @ ref.T / temperature
    is_self = torch.zeros_like(sim, dtype=torch.bool)
    if self_col is not None:
        is_self[rows, self_col] = True
    log_prob = sim.masked_fill(is_self, float("-inf")).log_softmax(dim=1)
    positives = (labels[:, None] == ref_labels[None, :]) & ~is_self
    per_query = -(log_prob.masked_fill(~positives, 0).sum(1)) / positives.sum(1).clamp_min(1)
    return per_query[positives.any(1)].mean()


class TinyConvNet(nn.Module):
    """Conv-BN-ReLU-pool-dropout-linear with a torchvision random crop + flip inside forward (training mode)."""

    def __init__(
        self, dim: int = 6, dropout: float = 0.3, augment: bool = True, require_channels_last: bool = False
    ) -> None:
        super().__init__()
        crop_and_flip = v2.Compose([v2.RandomResizedCrop(8, scale=(0.5, 1.0)), v2.RandomHorizontalFlip()])
        self.augment = crop_and_flip if augment else nn.Identity()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(5 * 4, dim)
        self.require_channels_last = require_channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.require_channels_last and not images.is_contiguous(memory_format=torch.channels_last):
            raise AssertionError("chunk lost channels_last")
        if self.training:
            images = self.augment(images)
        features = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(images))), 2).flatten(1)
        return F.normalize(self.head(self.dropout(features)), dim=1)


class TinyTextNet(nn.Module):
    """Masked mean of token embeddings -> dropout -> linear; takes a dict like a tokenizer's output."""

    def __init__(self, vocab: int = 30, dim: int = 6) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, 8)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(8, dim)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"].unsqueeze(-1).to(self.tokens.weight.dtype)
        pooled = (self.tokens(batch["input_ids"]) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.head(self.dropout(pooled))


def make_model(dtype: torch.dtype = torch.float64, **kwargs) -> TinyConvNet:
    torch.manual_seed(0)
    model = TinyConvNet(**kwargs).to(dtype)
    with torch.no_grad():  # non-trivial running statistics for the frozen BatchNorm
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return freeze_batchnorm(model)


def make_batch(num_rows: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_rows, 3, 10, 10, generator=generator, dtype=dtype)
    labels = torch.arange(num_rows) % max(2, num_rows // 3)
    return images, labels


def gradients(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def reference_chunked_autograd(model, loss_fn, inputs, labels, chunk_size) -> torch.Tensor:
    """Plain backward through one graph over the whole batch, the model called chunk by chunk (so that a random
    model draws its random numbers in the same order as multistage_backward's first pass)."""
    num_rows = len(labels)
    if isinstance(inputs, dict):
        chunks = [{k: v[s : s + chunk_size] for k, v in inputs.items()} for s in range(0, num_rows, chunk_size)]
    else:
        chunks = [inputs[s : s + chunk_size] for s in range(0, num_rows, chunk_size)]
    loss = loss_fn(torch.cat([model(chunk) for chunk in chunks]), labels)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("num_rows, chunk_size", [(12, 5), (23, 4), (23, 7), (37, 16), (9, 50)])
def test_deterministic_model_matches_single_full_batch_pass(num_rows: int, chunk_size: int) -> None:
    images, labels = make_batch(num_rows)
    model = make_model().eval()
    expected_loss = contrastive_loss(model(images), labels)
    expected_loss.backward()
    expected = gradients(model)
    model.zero_grad()

    loss = multistage_backward(model, contrastive_loss, images, labels, chunk_size)

    assert relative_error(gradients(model), expected) < 1e-5
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)


@pytest.mark.parametrize("num_rows, chunk_size", [(12, 5), (23, 7), (30, 8)])
def test_dropout_and_augmentation_are_replayed(num_rows: int, chunk_size: int) -> None:
    images, labels = make_batch(num_rows)
    model = make_model().train()
    torch.manual_seed(123)
    expected_loss = reference_chunked_autograd(model, contrastive_loss, images, labels, chunk_size)
    expected = gradients(model)
    rng_after_plain_pass = torch.get_rng_state()
    model.zero_grad()

    torch.manual_seed(123)
    loss = multistage_backward(model, contrastive_loss, images, labels, chunk_size, verify_replay=True)

    assert relative_error(gradients(model), expected) < 1e-5
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-12)
    assert torch.equal(torch.get_rng_state(), rng_after_plain_pass)


def test_gradients_accumulate_like_backward() -> None:
    images, labels = make_batch(14)
    model = make_model().eval()
    multistage_backward(model, contrastive_loss, images, labels, 5)
    once = gradients(model).clone()
    multistage_backward(model, contrastive_loss, images, labels, 5)
    assert relative_error(gradients(model), 2 * once) < 1e-12


def test_loss_kwargs_reach_the_loss() -> None:
    images, labels = make_batch(15)
    model = make_model().eval()
    sharp = multistage_backward(model, contrastive_loss, images, labels, 4, loss_kwargs={"temperature": 0.1})
    with torch.no_grad():
        expected = contrastive_loss(model(images), labels, temperature=0.1)
        default = contrastive_loss(model(images), labels)
    assert sharp.item() == pytest.approx(expected.item(), rel=1e-12)
    assert sharp.item() != pytest.approx(default.item(), rel=1e-3)


def test_dict_inputs() -> None:
    torch.manual_seed(0)
    model = TinyTextNet().double().train()
    generator = torch.Generator().manual_seed(2)
    batch = {
        "input_ids": torch.randint(0, 30, (19, 7), generator=generator),
        "attention_mask": (torch.rand(19, 7, generator=generator) > 0.3).long(),
    }
    labels = torch.arange(19) % 5
    torch.manual_seed(7)
    reference_chunked_autograd(model, contrastive_loss, batch, labels, 6)
    expected = gradients(model)
    model.zero_grad()
    torch.manual_seed(7)
    multistage_backward(model, contrastive_loss, batch, labels, 6, verify_replay=True)
    assert relative_error(gradients(model), expected) < 1e-5


def test_channels_last_inputs_stay_channels_last() -> None:
    images, labels = make_batch(17)
    model = make_model(require_channels_last=True).eval()
    images = images.to(memory_format=torch.channels_last)
    contrastive_loss(model(images), labels).backward()
    expected = gradients(model)
    model.zero_grad()
    multistage_backward(model, contrastive_loss, images, labels, 5)
    assert relative_error(gradients(model), expected) < 1e-5


def test_bfloat16_autocast_is_close_to_float32() -> None:
    images, labels = make_batch(20, dtype=torch.float32)
    model = make_model(dtype=torch.float32).eval()
    contrastive_loss(model(images), labels).backward()
    expected = gradients(model)
    model.zero_grad()

    loss = multistage_backward(model, contrastive_loss, images, labels, 6, autocast_dtype=torch.bfloat16)

    assert loss.dtype == torch.float32
    error = relative_error(gradients(model), expected)
    assert 0 < error < 5e-2  # bf16 forward passes really ran, and stay close


def test_float16_grad_scaler_scales_embedding_gradient() -> None:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            nn.Conv2d(3, 2, 3)(torch.randn(1, 3, 5, 5))
    except RuntimeError as error:
        pytest.skip(f"float16 autocast unsupported on this CPU build: {error}")
    images, labels = make_batch(20, dtype=torch.float32)
    model = make_model(dtype=torch.float32).eval()
    contrastive_loss(model(images), labels).backward()
    expected = gradients(model)
    model.zero_grad()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

    multistage_backward(model, contrastive_loss, images, labels, 6, autocast_dtype=torch.float16, scaler=scaler)

    assert relative_error(gradients(model) / 2.0**12, expected) < 5e-2
    before = [p.detach().clone() for p in model.parameters()]
    scaler.unscale_(optimizer)
    assert relative_error(gradients(model), expected) < 5e-2
    scaler.step(optimizer)
    scaler.update()
    for old, param in zip(before, model.parameters()):
        assert torch.allclose(param, old - 0.1 * param.grad)


class LearnableTemperatureLoss(nn.Module):
    """The stand-in loss with a trainable temperature, like losses that carry their own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(embeddings, labels, temperature=self.log_temperature.exp())


def test_trainable_loss_parameters_get_their_gradient() -> None:
    images, labels = make_batch(16)
    model = make_model().eval()
    loss_fn = LearnableTemperatureLoss()
    loss_fn(model(images), labels).backward()
    expected_model, expected_loss = gradients(model), loss_fn.log_temperature.grad.clone()
    model.zero_grad()
    loss_fn.zero_grad()
    multistage_backward(model, loss_fn, images, labels, 5)
    assert relative_error(gradients(model), expected_model) < 1e-5
    assert relative_error(loss_fn.log_temperature.grad, expected_loss) < 1e-5


def _compile_problem() -> str | None:
    """Why torch.compile cannot run here, or None when it can."""
    try:
        torch.compile(lambda x: torch.sin(x) + 1, dynamic=False)(torch.ones(2))
    except Exception as error:  # noqa: BLE001 - any failure of the compiler toolchain means: skip
        return f"{type(error).__name__}: {error}"
    return None


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compiled_model(backend: str) -> None:
    """Dropout inside a compiled graph replays too (inductor draws its random seeds from torch's RNG)."""
    problem = _compile_problem() if backend == "inductor" else None
    if problem is not None:
        pytest.skip(f"torch.compile unusable on this machine: {problem}")
    torch._dynamo.reset()
    images, labels = make_batch(14, dtype=torch.float32)
    model = make_model(dtype=torch.float32, augment=False).train()
    compiled = torch.compile(model, backend=backend)
    torch.manual_seed(5)
    reference_chunked_autograd(compiled, contrastive_loss, images, labels, 5)
    expected = gradients(model)
    model.zero_grad()
    torch.manual_seed(5)
    multistage_backward(compiled, contrastive_loss, images, labels, 5, verify_replay=True)
    assert relative_error(gradients(model), expected) < 1e-4


def test_frozen_batchnorm_statistics_do_not_change() -> None:
    images, labels = make_batch(16)
    model = make_model().train()
    before = {name: buffer.clone() for name, buffer in model.bn.named_buffers()}
    multistage_backward(model, contrastive_loss, images, labels, 5)
    for name, buffer in model.bn.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert model.bn.weight.grad is not None and model.bn.weight.grad.abs().sum() > 0


def test_batchnorm_in_training_mode_is_refused() -> None:
    images, labels = make_batch(8)
    model = TinyConvNet().double().train()
    with pytest.raises(ValueError, match="freeze_batchnorm"):
        multistage_backward(model, contrastive_loss, images, labels, 4)


def test_freeze_batchnorm_survives_train() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.SyncBatchNorm(4), nn.BatchNorm1d(4), nn.ReLU())
    assert freeze_batchnorm(model) is model
    model.train()
    assert model.training and model[0].training and model[4].training
    assert not any(m.training for m in model[1:4])
    assert all(is_frozen_batchnorm(m) for m in model[1:4]) and not is_frozen_batchnorm(model[0])
    assert batchnorm_layers_in_training_mode(model) == []
    assert batchnorm_layers_in_training_mode(nn.Sequential(nn.BatchNorm1d(2))) == ["0"]


def test_frozen_batchnorm_survives_deepcopy_and_pickling() -> None:
    model = freeze_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copy_ in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        copy_.train()
        assert copy_[0].training and not copy_[1].training and is_frozen_batchnorm(copy_[1])
        assert copy_[1].train.layer is copy_[1]


def test_unreplayable_randomness_is_detected() -> None:
    class PrivateNoise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)
            self.generator = torch.Generator().manual_seed(0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x + torch.randn(x.shape, generator=self.generator))

    labels = torch.arange(10) % 3
    with pytest.raises(RuntimeError, match="re-embedding rows 0:4"):
        multistage_backward(PrivateNoise(), contrastive_loss, torch.randn(10, 4), labels, 4, verify_replay=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"labels": torch.zeros(7, dtype=torch.long)}, "labels has 7 rows"),
        ({"inputs": {"x": torch.randn(8, 3), "y": torch.randn(5, 3)}}, "'y'"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    arguments = {"inputs": torch.randn(8, 3), "labels": torch.arange(8) % 2, "chunk_size": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        multistage_backward(nn.Linear(3, 2), contrastive_loss, **arguments)


@pytest.mark.parametrize("mixup", [None, SimilarityMixup()])
def test_real_recall_at_k_loss(mixup: SimilarityMixup | None) -> None:
    images, labels = make_batch(24)
    labels = torch.arange(24) % 6  # 4 items per class, as in the paper's sampler
    model = make_model().train()
    loss_fn = RecallAtKLoss(k=(1, 2, 4), tau_rank=0.05, mixup=mixup)
    torch.manual_seed(11)
    expected_loss = reference_chunked_autograd(model, loss_fn, images, labels, 7)
    expected = gradients(model)
    model.zero_grad()
    torch.manual_seed(11)
    loss = multistage_backward(model, loss_fn, images, labels, 7, verify_replay=True)
    assert expected.norm() > 0
    assert relative_error(gradients(model), expected) < 1e-5
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-12)
