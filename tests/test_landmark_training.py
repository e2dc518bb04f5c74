"""Landmark retrieval end to end on the CPU: the SfM-120k recipe trains a tiny model on an SfM-format fixture (and
evaluates Revisited Oxford/Paris fixtures after training), `recallk whiten` learns a whitening from its val pairs,
every way of loading the run applies it, and `recallk evaluate --benchmark roxford5k` evaluates the whitened model."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import recallk
from recallk.cli import main
from recallk.config import load_config
from recallk.data.landmarks import sfm120k_pairs
from recallk.data.revisited import read_revisited
from recallk.evaluation.multiscale import multiscale_descriptors
from recallk.evaluation.revisited import search_metrics
from recallk.models.export import load_exported
from recallk.recipes import recipe_path
from recallk.training.checkpoint import load_checkpoint
from recallk.training.evaluate_run import LandmarkDescriber, benchmark_descriptors
from revisited_fixtures import write_distractors, write_revisited

from data_fixtures import landmark_image, make_gldv2, make_sfm120k

TINY = [  # the recipe, shrunk to a CPU-sized model and batch
    "model.backbone=omniglot_cnn", "model.pretrained=false", "model.in_chans=3", "model.widths=[8,16]",
    "model.embed_dim=8", "data.image_size=16", "data.batch_size=8", "data.samples_per_class=2",
    "data.num_workers=0", "train.epochs=1", "train.max_steps=2", "train.chunk_size=4", "train.eval_every=1",
    "eval.batch_size=32", "output.plots=false",
]
# evaluation.json's keys of roxford5k (and with the distractor list distractors.txt) for the run's best.pt
KEY = "roxford5k (best.pt, 1024 px, scales 1 0.7071 0.5, whitening none)"
R1M_KEY = "roxford5k+distractors (best.pt, 1024 px, scales 1 0.7071 0.5, whitening none)"


@pytest.fixture(scope="module")
def sfm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("sfm")
    make_sfm120k(base / "data", {"train": {c: 3 for c in range(6)}, "val": {c: 4 for c in range(10, 16)}},
                 size=16, whiten=True)
    write_revisited(base / "data", "roxford5k")
    run = base / "run"
    status = main(["train", "sfm120k_resnet101_gem", *TINY, "eval.benchmarks=[roxford5k]", "--data-dir",
                   str(base / "data"), "--run-dir", str(run), "--device", "cpu"])
    assert status == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["benchmarks"]["roxford5k"]["scales"] == [1.0, 0.7071, 0.5]  # the recipe's eval.scales
    return run


@pytest.mark.parametrize("recipe", ["sfm120k_resnet101_gem", "gldv2_resnet50_gem"])
def test_landmark_recipes_pass_the_dry_run(recipe: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The dry run reads the training split and builds the sampler, so it gets data (and a batch that fits it)."""
    make_sfm120k(tmp_path, {"train": {c: 16 for c in range(2)}, "val": {c: 16 for c in range(10, 12)}})
    make_gldv2(tmp_path, {landmark: 4 for landmark in range(3)})
    args = ["train", recipe, "loss.name=smooth_ap", "data.batch_size=8", "data.samples_per_class=4",
            "data.options.val_landmarks=1", "--dry-run", "--data-dir", str(tmp_path)]
    assert main(args if recipe.startswith("gldv2") else [a for a in args if "val_landmarks" not in a]) == 0
    printed = capsys.readouterr().out
    assert "gem_lr_mult: 10.0" in printed and "freeze_batchnorm: true" in printed
    assert load_config(recipe_path(recipe)).data.batch_size == 4096


def test_dry_run_reads_the_landmark_lists(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """What training refuses first thing, the dry run refuses too: an empty data folder, a pickle without
    ``cluster``, a listed image that is missing."""
    dry_run = ["train", "sfm120k_resnet101_gem", "data.batch_size=8", "data.samples_per_class=4", "--dry-run",
               "--data-dir", str(tmp_path)]  # a batch the fixture fills: the dry run builds the sampler
    assert main(dry_run) == 2
    assert "retrieval-SfM-120k.pkl not found" in capsys.readouterr().err
    folder = make_sfm120k(tmp_path, {"train": {c: 16 for c in range(2)}, "val": {10: 16}})
    assert main(dry_run) == 0
    missing = sorted(p for p in (folder / "ims").rglob("*") if p.is_file())[0]
    content = missing.read_bytes()
    missing.unlink()
    assert main(dry_run) == 2
    error = capsys.readouterr().err
    assert "1 of" in error and "listed images are missing" in error and str(missing) in error
    missing.write_bytes(content)
    db = pickle.loads((folder / "retrieval-SfM-120k.pkl").read_bytes())
    del db["val"]["cluster"]
    (folder / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps(db))
    assert main(dry_run) == 2
    assert "part 'val' lacks cluster" in capsys.readouterr().err


def test_sfm_recipe_trains_and_whiten_learns_from_val_pairs(sfm_run: Path, capsys: pytest.CaptureFixture) -> None:
    plain = recallk.load_model(sfm_run)
    images = torch.rand(5, 3, 16, 16)
    unwhitened = plain.embed(images)
    assert unwhitened.shape == (5, 8)

    assert main(["whiten", str(sfm_run), "--pairs", "val", "--dim", "6", "--scales", "1", "--device", "cpu"]) == 0
    assert "(whitening learned from pairs 'val', 8 -> 6 dims)" in capsys.readouterr().out
    whitened_file = sfm_run / "checkpoints" / "whitened.pt"
    state = load_checkpoint(whitened_file)
    assert state["config"]["model"]["whitening"] == "learned" and state["config"]["model"]["whitening_dim"] == 6
    assert state["whitening"]["pairs"] == "sfm120k val (18 pairs)"

    model = recallk.load_model(sfm_run)  # the run now resolves to whitened.pt
    assert model.embed_dim == 6
    expected = model.network.whitening(unwhitened)
    torch.testing.assert_close(model.embed(images), expected, atol=1e-5, rtol=0)
    # fitted on the run's own descriptors of the val pairs: their differences now have unit variance in every direction
    base, names, pairs = sfm120k_pairs(sfm_run.parent / "data", "val")
    to_tensor = plain.preprocess.transform_fn  # full images (16 px < eval.image_size), at scale 1
    full_images = [to_tensor(Image.open(base / n).convert("RGB")) for n in names]
    descriptors = multiscale_descriptors(plain.network, full_images, torch.device("cpu"), progress=False).double()
    projection = model.network.whitening.projection.double()
    differences = (descriptors[pairs[:, 0]] - descriptors[pairs[:, 1]]) @ projection.t()
    torch.testing.assert_close(differences.t() @ differences / len(pairs), torch.eye(6, dtype=torch.float64),
                               atol=1e-3, rtol=0)

    saved = model.save_pretrained(sfm_run.parent / "shared")
    torch.testing.assert_close(recallk.load_model(saved).embed(images), expected, atol=1e-5, rtol=0)
    card = (Path(saved) / "README.md").read_text()
    assert "6-d unit-norm embeddings" in card and "learned whitening after the head" in card  # the whitened size
    assert "Inputs: full images, longer side shrunk to 1024 px" in card and "scales 1, 0.7071, 0.5" in card
    exported = sfm_run.parent / "model.pt"
    assert main(["export", str(sfm_run), "--format", "torchscript", "--out", str(exported)]) == 0
    with torch.no_grad():  # the exported graph is the network at one scale (the description's scales are not in it)
        torch.testing.assert_close(load_exported(exported, "torchscript")(images), model(images), atol=1e-5, rtol=0)

    # the benchmark: multi-scale descriptors (the recipe's eval.scales), whitened after aggregation
    assert main(["evaluate", str(sfm_run), "--benchmark", "roxford5k", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "medium" in printed and "mP@10" in printed
    saved = json.loads((sfm_run / "evaluation.json").read_text())[
        "roxford5k (whitened.pt, 1024 px, scales 1 0.7071 0.5, whitening learned 6-d)"]
    assert saved["whitening"] == "learned 6-d" and saved["scales"] == [1.0, 0.7071, 0.5]
    assert all(0 <= saved[protocol]["map"] <= 1 for protocol in ("easy", "medium", "hard"))

    # never overwritten silently; --force replaces it
    assert main(["whiten", str(sfm_run), "--pairs", "val"]) == 2
    assert "whitened.pt already exists; pass --force" in capsys.readouterr().err
    assert main(["whiten", str(sfm_run), "--pairs", "whiten", "--force", "--device", "cpu"]) == 0
    assert recallk.load_model(sfm_run).embed_dim == 8


def test_pca_whitening_from_images_and_bad_requests(sfm_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    for i in range(20):
        landmark_image(tmp_path / "sample" / f"{i}.jpg", i % 5, rng, size=16)
    out = tmp_path / "pca.pt"
    assert main(["whiten", str(sfm_run), "--images", str(tmp_path / "sample"), "--power", "0.25", "--dim", "4",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert "(whitening PCA, power 0.25, 8 -> 4 dims)" in capsys.readouterr().out
    assert recallk.load_model(out).embed(torch.rand(2, 3, 16, 16)).shape == (2, 4)

    assert main(["whiten", str(sfm_run), "--pairs", "val", "--power", "0.25", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--power sets PCA whitening (--images)" in capsys.readouterr().err
    assert main(["whiten", str(sfm_run), "--pairs", "test", "--out", str(tmp_path / "x.pt")]) == 2
    assert "unknown sfm120k pairs split 'test'" in capsys.readouterr().err
    assert main(["whiten", str(sfm_run), "--pairs", "val", "--dim", "9", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--dim 9: the whitening dimension must be in 1..8" in capsys.readouterr().err

    # too few images or pairs for the dimensions: refused before any image is read (these do not decode)
    for i in range(5):
        (tmp_path / "few" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "few" / f"{i}.jpg").write_bytes(b"not an image")
    assert main(["whiten", str(sfm_run), "--images", str(tmp_path / "few"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "PCA whitening to 8 dimensions needs more images than dimensions, got 5; pass at least 9 images or " \
           "--dim 4 or less" in capsys.readouterr().err
    small = make_sfm120k(tmp_path / "small", {"train": {0: 2}, "val": {1: 3, 2: 3}})
    shutil.rmtree(small / "ims")
    assert main(["whiten", str(sfm_run), "--pairs", "val", "--data-dir", str(tmp_path / "small"), "--out",
                 str(tmp_path / "x.pt")]) == 2
    assert "--pairs val lists 4 pairs, but learned whitening of 8-d descriptors needs at least 8" in \
           capsys.readouterr().err


def test_embed_search_and_load_model_describe_images_as_the_benchmark(sfm_run: Path, tmp_path: Path) -> None:
    """A landmark model (whitened, three scales) gives one descriptor per image, whichever command asks: `recallk
    embed --images`, `recallk search` and load_model().embed equal the benchmark's own descriptors, and the mAP of
    `embed`'s descriptors equals `recallk evaluate --benchmark`'s."""
    run = tmp_path / "run"
    shutil.copytree(sfm_run, run)
    (run / "checkpoints" / "whitened.pt").unlink(missing_ok=True)
    assert main(["whiten", str(run), "--pairs", "val", "--dim", "6", "--device", "cpu", "--scales",
                 "[1, 1/2**(1/2), 1/2]"]) == 0  # cirtorch's spelling of the recipe's scales
    data = sfm_run.parent / "data"
    model = recallk.load_model(run)
    assert model.description.full_images and model.description.scales == (1.0, 0.7071, 0.5)
    benchmark = read_revisited(data, "roxford5k")
    describe = LandmarkDescriber(model.network, model.config, torch.device("cpu"), progress=False)
    queries, database, _ = benchmark_descriptors(describe, benchmark)
    assert database.shape == (len(benchmark.database), 6)

    # queries cropped to their box, as the benchmark crops them (no scaling: the images are under eval.image_size)
    cropped = []
    for number, (path, box) in enumerate(zip(benchmark.queries, benchmark.boxes)):
        x1, y1, x2, y2 = (round(v) for v in box)
        cropped.append(tmp_path / "queries" / f"{number}.png")
        cropped[-1].parent.mkdir(exist_ok=True)
        Image.open(path).convert("RGB").crop((x1, y1, x2, y2)).save(cropped[-1])
    torch.testing.assert_close(model.embed(list(benchmark.database)), database, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.embed(cropped), queries, atol=1e-5, rtol=0)

    out = tmp_path / "database.npz"
    result = subprocess.run([sys.executable, "-m", "recallk", "embed", str(run), "--images",
                             *map(str, benchmark.database), "--out", str(out), "--device", "cpu", "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    embedded = torch.from_numpy(np.load(out)["embeddings"])
    torch.testing.assert_close(embedded, database, atol=1e-5, rtol=0)

    assert main(["evaluate", str(run), "--benchmark", "roxford5k", "--device", "cpu", "--quiet"]) == 0
    evaluated = json.loads((run / "evaluation.json").read_text())
    key = "roxford5k (whitened.pt, 1024 px, scales 1 0.7071 0.5, whitening learned 6-d)"
    from_embed = search_metrics(model.embed(cropped), embedded, benchmark.gnd)
    for protocol in ("easy", "medium", "hard"):
        assert from_embed[protocol]["map"] == pytest.approx(evaluated[key][protocol]["map"], abs=1e-9)

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for path in benchmark.database:
        shutil.copy(path, gallery / path.name)
    report = tmp_path / "search.json"
    assert main(["search", str(run), "--gallery", str(gallery), "--query", str(cropped[0]), "--top-k", "3",
                 "--out", str(report), "--no-cache", "--device", "cpu", "--quiet"]) == 0
    names = [p.name for p in benchmark.database]
    for neighbour in json.loads(report.read_text())["results"][0]["neighbours"]:
        row = database[names.index(Path(neighbour["path"]).name)]
        assert neighbour["similarity"] == pytest.approx(float(queries[0] @ row), abs=1e-5)


def test_a_whitening_of_other_weights_is_refused(sfm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def copy(name: str) -> Path:
        shutil.copytree(sfm_run, tmp_path / name, ignore=shutil.ignore_patterns("whitened.pt", "search_cache"))
        return tmp_path / name

    run, trained_on = copy("run"), copy("trained_on")
    assert main(["train", "--resume", str(trained_on), "train.epochs=2", "train.max_steps=4",
                 "--device", "cpu", "--quiet"]) == 0  # new weights in last.pt
    capsys.readouterr()
    foreign = ["whiten", str(trained_on / "checkpoints" / "last.pt"), "--pairs", "val", "--scales", "1", "--device",
               "cpu", "--quiet"]
    assert main([*foreign, "--out", str(run / "checkpoints" / "whitened.pt")]) == 2  # refused before any work
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is a whitening of weights" in error and "best.pt weights" in error
    assert not (run / "checkpoints" / "whitened.pt").exists()
    # written anyway (an older recallk, a copied file): the run refuses to resolve to it, naming both
    assert main([*foreign, "--out", str(tmp_path / "whitened.pt")]) == 0
    shutil.copy(tmp_path / "whitened.pt", run / "checkpoints" / "whitened.pt")
    for command in (["evaluate", str(run), "--benchmark", "roxford5k", "--device", "cpu"],
                    ["embed", str(run), "--images", str(tmp_path), "--out", str(tmp_path / "e.npz")]):
        assert main(command) == 2
        error = capsys.readouterr().err
        assert f"of {trained_on / 'checkpoints' / 'last.pt'}" in error and f"recallk whiten {run} --force" in error
    assert main(["whiten", str(run), "--pairs", "val", "--scales", "1", "--device", "cpu", "--force", "--quiet"]) == 0
    assert recallk.load_model(run).embed_dim == 8  # fitted again on the run's own best.pt
    assert not (run / "descriptor_cache").exists()  # its descriptors were kept only while it computed them


def test_images_without_a_suffix_and_image_lists(sfm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ims = tmp_path / "ims"  # cirtorch's SfM-120k ims/: JPEGs named by their cid, without a suffix
    shutil.copytree(sfm_run.parent / "data" / "train" / "retrieval-SfM-120k" / "ims", ims)
    images = sorted(p for p in ims.rglob("*") if p.is_file())
    (ims / "NOTES").write_text("not an image, no suffix either")
    assert main(["embed", str(sfm_run), "--images", str(ims), "--out", str(tmp_path / "all.npz")]) == 0
    assert sorted(np.load(tmp_path / "all.npz")["item_ids"].tolist()) == sorted(map(str, images))
    listing = tmp_path / "list.txt"  # one path a line, relative to the list's folder or absolute
    listing.write_text(f"{images[0].relative_to(tmp_path)}\n\n{images[1]}\n")
    assert main(["embed", str(sfm_run), "--images", str(listing), "--out", str(tmp_path / "two.npz")]) == 0
    assert np.load(tmp_path / "two.npz")["item_ids"].tolist() == [str(images[0]), str(images[1])]
    assert main(["whiten", str(sfm_run), "--images", str(ims), "--dim", "4", "--scales", "1", "--out",
                 str(tmp_path / "pca.pt"), "--device", "cpu", "--quiet"]) == 0
    assert "PCA, power 0.5, 8 -> 4 dims" in capsys.readouterr().out
    listing.write_text("missing.jpg\n")
    assert main(["whiten", str(sfm_run), "--images", str(listing), "--out", str(tmp_path / "x.pt")]) == 2
    assert f"image {tmp_path / 'missing.jpg'} listed in image list {listing} does not exist" in capsys.readouterr().err


def test_embed_a_landmark_run_defaults_to_its_test_split(sfm_run: Path, tmp_path: Path) -> None:
    assert main(["embed", str(sfm_run), "--out", str(tmp_path / "val.npz"), "--device", "cpu", "--quiet"]) == 0
    saved = np.load(tmp_path / "val.npz")  # data.split_test of the recipe is [val]; sfm120k has no split 'test'
    assert len(saved["item_ids"]) == 24 and len(set(saved["labels"].tolist())) == 6


def test_unreadable_images_fail_before_the_descriptors_or_are_skipped(sfm_run: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    shutil.copytree(sfm_run.parent / "data", data)
    listing = write_distractors(tmp_path / "r1m", 3)
    (tmp_path / "r1m" / "jpg" / "d2.jpg").write_bytes(b"GIF89a broken")
    out = tmp_path / "evaluation.json"
    evaluate = ["evaluate", str(sfm_run / "checkpoints" / "best.pt"), "--benchmark", "roxford5k", "--data-dir",
                str(data), "--distractors", str(listing), "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(evaluate) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "1 of 20 roxford5k images cannot be read, e.g." in error and "d2.jpg" in error
    assert main([*evaluate, "--skip-bad-images"]) == 0
    assert json.loads(out.read_text())[R1M_KEY]["distractors"] == 2

    _, names, _ = sfm120k_pairs(data, "val")
    (data / "train" / "retrieval-SfM-120k" / "ims" / names[0]).write_bytes(b"")  # in one of the 18 val pairs
    whiten = ["whiten", str(sfm_run / "checkpoints" / "best.pt"), "--pairs", "val", "--data-dir", str(data),
              "--scales", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "w.pt")]
    assert main(whiten) == 2
    assert "1 of 24 images to fit the whitening on cannot be read" in capsys.readouterr().err
    assert main([*whiten, "--skip-bad-images"]) == 0
    assert load_checkpoint(tmp_path / "w.pt")["whitening"]["pairs"] == "sfm120k val (17 pairs)"


def test_an_interrupted_benchmark_resumes_from_its_descriptor_cache(
    sfm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(sfm_run, run, ignore=shutil.ignore_patterns("whitened.pt", "evaluation.*"))
    listing = write_distractors(tmp_path / "r1m", 3)
    good = (tmp_path / "r1m" / "jpg" / "d1.jpg").read_bytes()
    (tmp_path / "r1m" / "jpg" / "d1.jpg").write_bytes(good[: len(good) // 2])  # its header reads; its pixels do not
    evaluate = ["evaluate", str(run), "--benchmark", "roxford5k", "--distractors", str(listing), "--device", "cpu",
                "--quiet"]
    assert main(evaluate) == 2  # after the queries' and the database's descriptors
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "cannot decode image" in error and "d1.jpg" in error
    kept = sorted((run / "descriptor_cache").glob("*.pt"))
    assert len(kept) == 2  # one chunk of queries, one of the database

    (tmp_path / "r1m" / "jpg" / "d1.jpg").write_bytes(good)
    with caplog.at_level("INFO"):
        assert main(evaluate[:-1]) == 0  # without --quiet: the resumption is reported
    assert "the descriptors of 3 of 3 roxford5k queries are read from" in caplog.text
    assert "the descriptors of 14 of 14 roxford5k database are read from" in caplog.text
    assert not (run / "descriptor_cache").exists()  # removed once the metrics are saved
    resumed = json.loads((run / "evaluation.json").read_text())[R1M_KEY]
    assert main([*evaluate, "--out", str(tmp_path / "fresh.json")]) == 0  # computed from scratch
    assert json.loads((tmp_path / "fresh.json").read_text())[R1M_KEY] == resumed


def test_a_benchmark_of_a_read_only_run_is_computed_without_a_cache(
    sfm_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from test_newcomer_api import read_only

    run = tmp_path / "run"
    shutil.copytree(sfm_run, run, ignore=shutil.ignore_patterns("whitened.pt", "evaluation.*"))
    with read_only(run), caplog.at_level("WARNING"):
        assert main(["evaluate", str(run), "--benchmark", "roxford5k", "--device", "cpu", "--out",
                     str(tmp_path / "evaluation.json")]) == 0
    assert f"cannot keep descriptors in {run / 'descriptor_cache'} (not writable)" in caplog.text
    assert json.loads((tmp_path / "evaluation.json").read_text())[KEY]["database"] == 14


def test_the_descriptor_cache_is_keyed_by_the_weights_and_the_description(sfm_run: Path, tmp_path: Path) -> None:
    """A chunk of landmark descriptors is read back only for the same weights (a whitening's included) and the same
    Description (scales, eval.image_size, preprocessing); any other computation writes and reads its own."""
    import copy
    import dataclasses

    from recallk.models.whitening import pca_whitening
    from recallk.training.evaluate_run import load_trained_model

    model, config, _ = load_trained_model(sfm_run / "checkpoints" / "best.pt", torch.device("cpu"))
    paths = sorted((sfm_run.parent / "data" / "roxford5k" / "jpg").glob("*.jpg"))[:10]

    def described(network: torch.nn.Module = model, settings=config, scales=(1.0,)) -> tuple[torch.Tensor, set]:
        describe = LandmarkDescriber(network, settings, torch.device("cpu"), scales, progress=False,
                                     cache_dir=tmp_path / "cache")
        return torch.cat(list(describe(paths, "images"))), set(describe.cache.files)

    first, files = described()
    again, same_files = described()
    assert same_files == files and all(file.is_file() for file in files)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    whitened = copy.deepcopy(model)
    whitened.set_whitening(pca_whitening(torch.cat([first, -first, first.roll(1, 1)]), dim=4))
    other_weights = copy.deepcopy(model)
    with torch.no_grad():
        next(other_weights.parameters()).add_(1e-3)
    for other in (described(scales=(1.0, 0.5)), described(network=whitened), described(network=other_weights),
                  described(settings=dataclasses.replace(config, eval=dataclasses.replace(config.eval, image_size=12))),
                  described(settings=dataclasses.replace(config, data=dataclasses.replace(
                      config.data, options={**config.data.options, "mean": [0.5] * 3, "std": [0.5] * 3})))):
        assert not other[1] & files
