"""Cross-batch memory for RS@k: equal to RS@k on batch + memory computed directly; queue order; trainer option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recallk.config import ConfigError
from recallk.files import read_metrics
from recallk.losses import CrossBatchRecallAtK, RecallAtKLoss, SimilarityMixup
from recallk.losses.factory import build_loss
from recallk.training.checkpoint import load_checkpoint
from recallk.training.trainer import Trainer, train

from data_fixtures import make_glyph_folder
from run_fixtures import tiny_config


def batch(seed: int, n: int = 8, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return emb, torch.randint(0, 4, (n,), generator=g)


def test_loss_equals_rsk_on_batch_plus_memory_computed_directly() -> None:
    loss = RecallAtKLoss(k=(1, 2, 4))
    memory_loss = CrossBatchRecallAtK(loss, embedding_size=5, memory_size=12).double()
    seen_emb, seen_labels = [], []
    for step in range(5):  # 8 rows a step into 12 slots: the queue wraps around from step 2 on
        emb, labels = batch(step)
        emb.requires_grad_(True)
        value = memory_loss(emb, labels)
        (grad,) = torch.autograd.grad(value, emb)

        past_emb = torch.cat(seen_emb)[-12:] if seen_emb else emb[:0].detach()
        past_labels = torch.cat(seen_labels)[-12:] if seen_labels else labels[:0]
        direct_emb = emb.detach().clone().requires_grad_(True)
        expected = loss(direct_emb, labels, ref_emb=torch.cat([direct_emb, past_emb]),
                        ref_labels=torch.cat([labels, past_labels]), query_index=torch.arange(8))
        (expected_grad,) = torch.autograd.grad(expected, direct_emb)
        assert float(value.detach()) == pytest.approx(float(expected.detach()), abs=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
        if step == 0:  # an empty memory is RS@k on the batch
            assert float(value.detach()) == pytest.approx(float(loss(emb, labels).detach()), abs=1e-12)

        seen_emb.append(emb.detach())
        seen_labels.append(labels)
        stored, stored_labels = memory_loss.memory()
        assert memory_loss.filled == min(12, 8 * (step + 1))
        # the memory holds exactly the most recent rows (in ring order)
        recent = torch.cat(seen_emb)[-12:]
        assert sorted(map(tuple, stored.tolist())) == sorted(map(tuple, recent.tolist()))
        assert sorted(stored_labels.tolist()) == sorted(torch.cat(seen_labels)[-12:].tolist())


def test_eval_mode_leaves_the_memory_and_state_dict_round_trips() -> None:
    memory_loss = CrossBatchRecallAtK(RecallAtKLoss(), embedding_size=5, memory_size=20).double()
    memory_loss(*batch(0))
    memory_loss.eval()
    memory_loss(*batch(1))
    assert memory_loss.filled == 8
    copy = CrossBatchRecallAtK(RecallAtKLoss(), embedding_size=5, memory_size=20).double()
    copy.load_state_dict(memory_loss.state_dict())
    copy.eval()
    emb, labels = batch(2)
    assert float(copy(emb, labels)) == float(memory_loss(emb, labels))
    assert torch.equal(copy.memory()[0], memory_loss.memory()[0])
    big = CrossBatchRecallAtK(RecallAtKLoss(), embedding_size=5, memory_size=3)
    big(*[t.float() if t.is_floating_point() else t for t in batch(3)])  # a batch larger than the memory
    assert big.filled == 3


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="does not combine with SiMix"):
        CrossBatchRecallAtK(RecallAtKLoss(mixup=SimilarityMixup()), 5)
    with pytest.raises(ValueError, match="memory_size must be a positive integer"):
        CrossBatchRecallAtK(RecallAtKLoss(), 5, memory_size=0)
    with pytest.raises(ValueError, match="embedding_size=5"):
        CrossBatchRecallAtK(RecallAtKLoss(), 7)(*batch(0))
    with pytest.raises(ValueError, match="miners do not apply"):
        CrossBatchRecallAtK(RecallAtKLoss(), 5)(*batch(0), (torch.arange(2),) * 3)
    with pytest.raises(ValueError, match="rsk loss only"):
        build_loss("contrastive", memory_size=10)
    assert isinstance(build_loss("rsk", embed_dim=16, memory_size=10), CrossBatchRecallAtK)
    with pytest.raises(ConfigError, match="loss.memory_size"):
        tiny_config(Path("."), loss__memory_size=64, loss__simix=True)


def test_trainer_option_trains_and_resumes_with_the_memory(tmp_path: Path) -> None:
    data_dir = make_glyph_folder(tmp_path / "glyphs", classes=8, per_class=4)
    config = tiny_config(tmp_path, loss__memory_size=24, train__epochs=2, output__plots=False)
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    train(config, full_dir, data_dir=data_dir, progress=False)
    memory = load_checkpoint(full_dir / "checkpoints" / "last.pt")["loss"]
    assert int(memory["filled_count"]) == 24 and memory["memory_embeddings"].shape == (24, 16)
    # RS@k with a memory differs from RS@k without one from the second step on
    plain_dir = tmp_path / "plain"
    train(tiny_config(tmp_path, train__epochs=2, output__plots=False), plain_dir, data_dir=data_dir, progress=False)
    plain_loss, memory_loss = (read_metrics(d / "metrics.csv")[0]["train_loss"] for d in (plain_dir, full_dir))
    assert plain_loss != memory_loss
    # stopped after one step and resumed, the memory is restored and the run repeats exactly
    train(tiny_config(tmp_path, loss__memory_size=24, train__epochs=2, output__plots=False, train__max_steps=1),
          cut_dir, data_dir=data_dir, progress=False)
    trainer = Trainer(config, cut_dir, resume=True, data_dir=data_dir, progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    def whole_epochs(run: Path) -> list:  # the cut run also holds the row of its max_steps stop (epoch 0.5)
        return [r["train_loss"] for r in read_metrics(run / "metrics.csv") if float(r["epoch"]).is_integer()]

    assert whole_epochs(cut_dir) == whole_epochs(full_dir)
