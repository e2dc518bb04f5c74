"""What a new user meets in the Python API and the model commands (issue 19): saved models that overwrite nothing
and carry no machine paths, inputs refused with one line that says what to do, read-only folders, warnings.

Commands run in-process through :func:`recallk.cli.main` (the same code as the ``recallk`` script, much faster).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import recallk
from recallk import RecallAtKLoss, retrieval_metrics
from recallk.cli import main
from recallk.evaluation.index import Index
from recallk.losses.unit_norm import UnnormalizedEmbeddingsWarning


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one ``recallk: error:`` line of the command's stderr (progress bars may precede it)."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith("recallk: error: ") and sum("error" in line for line in err) == 1, err
    return err[-1]


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[str]:
    """``folder`` made unwritable for real: a read-only bind mount as root (chmod does not stop root), else
    ``chmod 555``. Yields the reason the write error must give."""
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot make a read-only bind mount as root here: {mounted.stderr.decode().strip()}")
        try:
            yield "read-only file system"
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield "no permission to write there"
        finally:
            folder.chmod(0o755)


def unit(rows: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# Saved models: nothing overwritten, no machine paths, the usual permissions


def test_save_pretrained_overwrites_only_when_asked_and_never_a_foreign_folder(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = recallk.load_model(trained_run)
    folder = model.save_pretrained(tmp_path / "tiny-rsk")
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card + "\nmy notes\n")
    with pytest.raises(ValueError, match="already holds a saved model; pass overwrite=True"):
        model.save_pretrained(folder)
    assert (folder / "README.md").read_text().endswith("my notes\n")
    assert main(["export", str(trained_run), "--format", "pretrained", "--out", str(folder)]) == 2
    assert "--overwrite" in error_line(capsys)
    assert main(["export", str(trained_run), "--format", "pretrained", "--out", str(folder), "--overwrite"]) == 0
    assert (folder / "README.md").read_text() == card

    project = tmp_path / "my-project"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not a folder of a saved recallk model"):
            model.save_pretrained(project, overwrite=overwrite)
    assert main(["export", str(trained_run), "--format", "pretrained", "--out", str(project), "--overwrite"]) == 2
    assert "README.md" in error_line(capsys)
    assert sorted(p.name for p in project.iterdir()) == ["README.md"]
    assert (project / "README.md").read_text() == "# my project\n"


def test_saved_folder_has_no_machine_paths_and_one_file_mode(trained_run: Path, tmp_path: Path) -> None:
    run_config = (trained_run / "config.yaml").read_text()
    machine = str(trained_run.parent)  # the data root and the runs root of the fixture live here
    assert machine in run_config  # the situation is real: the run's own config names this machine's folders
    folder = recallk.load_model(trained_run).save_pretrained(tmp_path / "shared")
    for name in ("config.json", "README.md"):
        assert machine not in (folder / name).read_text(), name
    config = json.loads((folder / "config.json").read_text())["config"]
    assert config["data"]["data_dir"] is None and config["output"]["run_dir"] is None
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == modes["README.md"], modes
    image = np.zeros((16, 16), np.uint8)
    torch.testing.assert_close(
        recallk.load_model(folder).embed(image), recallk.load_model(trained_run).embed(image), atol=1e-6, rtol=0
    )


def test_onnx_export_and_training_into_a_read_only_folder_are_one_line(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exported"
    out.mkdir()
    with read_only(out) as reason:
        status = main(["export", str(trained_run), "--format", "onnx", "--out", str(out / "model.onnx")])
        assert status == 2
        line = error_line(capsys)
        assert str(out / "model.onnx") in line and reason in line.lower() and "--out" in line, line
        assert "free disk space" not in line
        data = str(trained_run.parent / "data")
        status = main(["train", str(trained_run / "config.yaml"), "--run-dir", str(out / "run"), "--data-dir", data])
        assert status == 2
        line = error_line(capsys)
        assert str(out / "run") in line and "--run-dir DIR" in line, line
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# recallk search on a read-only run: --cache DIR / --no-cache, and an error that names them


def test_search_on_a_read_only_run(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("search_cache", "plots", "tensorboard"))
    gallery = sorted((trained_run.parent / "data" / "test").rglob("*.png"))[:6]
    common = ["--gallery", *map(str, gallery[1:]), "--query", str(gallery[0]), "--top-k", "2", "--device", "cpu"]
    with read_only(run) as reason:
        assert main(["search", str(run), *common, "--out", str(tmp_path / "a.json")]) == 2
        line = error_line(capsys)
        assert reason in line.lower() and "--cache DIR, or --no-cache" in line and "search_cache" in line, line
        assert main(["search", str(run), *common, "--out", str(tmp_path / "b.json"), "--no-cache"]) == 0
        assert "not cached: --no-cache" in capsys.readouterr().out
        cache = tmp_path / "cache"
        assert main(["search", str(run), *common, "--out", str(tmp_path / "c.json"), "--cache", str(cache)]) == 0
        assert main(["search", str(run), *common, "--out", str(tmp_path / "d.json"), "--cache", str(cache)]) == 0
        assert "(cached)" in capsys.readouterr().out
        assert main(["search", str(run), *common, "--cache", str(cache), "--out", str(run / "e.json")]) == 2
        assert "--out FILE" in error_line(capsys)
    assert [p.name for p in cache.iterdir()][0].startswith("gallery-")
    results = [json.loads((tmp_path / f"{name}.json").read_text()) for name in "bcd"]
    neighbours = [[result["neighbours"] for result in report["results"]] for report in results]
    assert neighbours[0] == neighbours[1] == neighbours[2]
    assert results[0]["cache"] is None and results[2]["cached"]


# ---------------------------------------------------------------------------------------------------------------------
# model.embed: numpy images; tensors of another size or channel count refused; Index.search of a path refused


def test_embed_takes_numpy_images_and_refuses_tensors_of_another_shape(trained_run: Path) -> None:
    model = recallk.load_model(trained_run)
    path = sorted((trained_run.parent / "data" / "test").rglob("*.png"))[0]
    pil = Image.open(path)
    expected = model.embed(pil)
    grey = np.asarray(pil.convert("L"))
    for array in (grey, grey[:, :, None], np.stack([grey] * 3, axis=2), grey / 255.0, grey.astype(np.float32)):
        torch.testing.assert_close(model.embed(array), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.embed([grey, grey]), expected.repeat(2, 1), atol=1e-6, rtol=0)

    tensor = model.preprocess(path)
    assert tensor.shape == (1, 16, 16)
    with pytest.raises(ValueError, match=r"input shape \(C, H, W\) = \(1, 16, 16\), got \(3, 16, 16\) \(another "
                                         r"number of channels\).*model.preprocess\(image\)"):
        model.embed(tensor.expand(3, 16, 16))
    bigger = torch.nn.functional.interpolate(tensor[None], size=(24, 24))
    with pytest.raises(ValueError, match=r"got \(1, 24, 24\) \(another size\)"):
        model.embed(bigger)
    with pytest.raises(ValueError, match="another size"):
        model.embed([bigger[0]])
    with pytest.raises(ValueError, match=r"numpy image must be \(H, W\) or \(H, W, C\)"):
        model.embed(np.zeros((16, 16, 2), np.uint8))

    index = Index(expected.repeat(3, 1), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"takes query embeddings.*model.embed"):
        index.search(str(path))
    assert index.search(expected.numpy(), k=1)[0][0].item_id == "a"


def test_embedded_splits_keep_their_class_names(trained_run: Path) -> None:
    saved = np.load(trained_run / "embeddings_test.npz")  # written by the trainer, as `recallk embed` writes it
    names = saved["class_names"][saved["labels"]]
    assert [Path(item).parent.name for item in saved["item_ids"]] == names.tolist()


# ---------------------------------------------------------------------------------------------------------------------
# The loss and the metrics: one line for meta tensors, double backward, class names; warnings for k and norms


def test_meta_tensors_double_backward_and_label_types_are_one_line() -> None:
    loss = RecallAtKLoss(k=(1, 2))
    embeddings, labels = unit(12), torch.arange(4).repeat(3)
    for call in (lambda: loss(embeddings.to("meta"), labels), lambda: retrieval_metrics(embeddings.to("meta"), labels),
                 lambda: loss(embeddings, labels.to("meta"))):
        with pytest.raises(ValueError, match="on the meta device.*to_empty"):
            call()
    leaf = embeddings.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="no second derivative, so create_graph=True"):
        torch.autograd.grad(loss(leaf, labels), leaf, create_graph=True)
    (grad,) = torch.autograd.grad(loss(leaf, labels), leaf)  # first order still works
    assert grad.abs().sum() > 0

    names = np.array(["cat", "dog", "owl", "emu"])[labels.numpy()]
    for given in (names, names.tolist()):
        with pytest.raises(ValueError, match=r"class names; torch.as_tensor\(np.unique\(labels, return_inverse=True\)"):
            loss(embeddings, given)
    with pytest.raises(ValueError, match="of class names"):
        retrieval_metrics(embeddings, names)
    with pytest.raises(ValueError, match=r"a numpy array; pass torch.as_tensor\(labels\)"):
        loss(embeddings, labels.numpy())
    encoded = torch.as_tensor(np.unique(names, return_inverse=True)[1])  # the hint works as written
    assert torch.equal(loss(embeddings, encoded), loss(embeddings, labels))


def test_k_larger_than_the_batch_and_unnormalised_metrics_warn_once() -> None:
    embeddings, labels = unit(12), torch.arange(4).repeat(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        RecallAtKLoss(k=(1, 16))(embeddings, labels)
        RecallAtKLoss(k=(1, 16))(embeddings[:8], labels[:8])
        RecallAtKLoss(k=(1, 10))(embeddings, labels)  # 11 others: fine
        retrieval_metrics(embeddings * 3, labels)
        retrieval_metrics(embeddings * 2, labels)
        retrieval_metrics(embeddings, labels, ref_embeddings=embeddings * 2, ref_labels=labels)
    large_k = [str(w.message) for w in caught if "largest k" in str(w.message)]
    assert large_k == [large_k[0]] and "largest k (16)" in large_k[0] and "more than 17 items" in large_k[0]
    norms = [str(w.message) for w in caught if issubclass(w.category, UnnormalizedEmbeddingsWarning)]
    assert len(norms) == 2 and all("retrieval_metrics ranks them by raw dot product" in m for m in norms), norms
    assert "ref_embeddings" in norms[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        retrieval_metrics(embeddings, labels)
        retrieval_metrics(embeddings.bfloat16(), labels)


# ---------------------------------------------------------------------------------------------------------------------
# PML's SelfSupervisedLoss refuses RS@k: the migration guide's replacement (two views labelled by image) runs


def test_the_docs_replacement_for_self_supervised_loss() -> None:
    from pytorch_metric_learning.losses import SelfSupervisedLoss

    loss_fn = RecallAtKLoss(k=(1, 2, 4))
    with pytest.raises(Exception, match="not supported"):
        SelfSupervisedLoss(loss_fn)(unit(8), unit(8, seed=1))
    model = torch.nn.Linear(8, 8)
    images = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    view1, view2 = images + 0.1 * torch.randn_like(images), images + 0.1 * torch.randn_like(images)
    # -- as in docs/guide/migrating.md
    embeddings = torch.nn.functional.normalize(model(torch.cat([view1, view2])), dim=1)
    labels = torch.arange(len(view1)).repeat(2)  # image i's two views share label i
    loss = loss_fn(embeddings, labels)
    # --
    loss.backward()
    assert 0 < loss.item() < 1 and model.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# Help texts and messages that misled


def test_help_examples_and_recipe_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("evaluate", "embed"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "runs/sop/last.pt" not in text and "checkpoints/" in text
    assert "images or sentences per forward pass" in text
    missing = tmp_path / "my_recipe.yaml"
    os.chdir(tmp_path)
    try:
        assert main(["train", "my_recipe.yaml", "--dry-run"]) == 2
    finally:
        os.chdir(Path(__file__).parent)
    line = error_line(capsys)
    assert "config file 'my_recipe.yaml' does not exist" in line and "no bundled recipe" not in line
    assert not missing.exists()
