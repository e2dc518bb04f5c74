"""Landmark retrieval evaluation: the Revisited Oxford/Paris metric, reader, crop, distractors, multi-scale
descriptors and ``recallk evaluate --benchmark`` on a generated tree in the official layout."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from recallk.data.revisited import LandmarkImages, read_revisited
from recallk.errors import RecallkUsageError
from recallk.evaluation import revisited_metrics
from recallk.evaluation.multiscale import multiscale_descriptors, parse_scales, rescale
from recallk.evaluation.revisited import format_revisited_table, search_metrics
from recallk.models.factory import create_model
from recallk.models.heads import GeM
from revisited_fixtures import write_distractors, write_revisited

REPO = Path(__file__).resolve().parents[1]


def one_query(easy: list[int], hard: list[int] = (), junk: list[int] = ()) -> list[dict]:
    return [{"easy": list(easy), "hard": list(hard), "junk": list(junk)}]


# ---------------------------------------------------------------------------------------------------------------------
# The metric


def test_trapezoid_ap_is_not_sklearns() -> None:
    """Positives at positions 0 and 2: (1 + 1)/4 + (1/2 + 2/3)/4 = 0.7917 (sklearn's AP would be 0.8333)."""
    scores = np.array([[0.9, 0.1, 0.5, 0.3]])  # ranking: 0, 2, 3, 1
    result = revisited_metrics(scores, one_query(easy=[0, 3]))
    assert result["easy"]["map"] == pytest.approx(19 / 24)
    assert result["easy"]["map"] != pytest.approx(5 / 6)
    # mP@k: last positive at 1-based position 3; k' = min(k, 3)
    assert result["easy"]["mp@1"] == pytest.approx(1.0)
    assert result["easy"]["mp@5"] == pytest.approx(2 / 3)
    assert result["easy"]["mp@10"] == pytest.approx(2 / 3)
    assert result["hard"]["num_queries"] == 0 and math.isnan(result["hard"]["map"])


def test_protocols_shift_positives_past_ignored_items() -> None:
    """Ranking 0..5 by index: junk 0, easy 1, hard 2, negative 3, easy 4, hard 5."""
    scores = np.linspace(1, 0, 6)[None]
    result = revisited_metrics(scores, one_query(easy=[1, 4], hard=[2, 5], junk=[0]), kappas=(1, 2, 5))
    # easy: ignore 0, 2, 5 -> positives at 0 and 2 (item 4 had 2 ignored items before it)
    assert result["easy"]["map"] == pytest.approx(19 / 24)
    assert result["easy"]["mp@2"] == pytest.approx(1 / 2)
    # medium: ignore 0 -> positives at 0, 1, 3, 4: AP = (1 + 1 + (2/3 + 3/4) + (3/4 + 4/5)) / 8
    assert result["medium"]["map"] == pytest.approx((2 + 2 + (2 / 3 + 3 / 4) + (3 / 4 + 4 / 5)) / 8)
    assert result["medium"]["mp@5"] == pytest.approx(4 / 5)
    # hard: ignore 0, 1, 4 -> positives at 0 and 2: AP 0.7917, mP@1 1
    assert result["hard"]["map"] == pytest.approx(19 / 24)
    assert result["hard"]["mp@1"] == 1.0


def test_first_positive_late_and_queries_without_positives_left_out() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]])
    gnd = one_query(easy=[2]) + one_query(easy=[0], hard=[3])  # query 0 has no hard positive
    result = revisited_metrics(scores, gnd, kappas=(1, 5))
    # query 0: single positive at 2 -> AP = (0 + 1/3) / 2 = 1/6, mP@5 with k' = 3: 1/3
    # query 1 (easy): ranking 3, 2, 1, 0; ignore hard 3 -> positive at 2 -> AP 1/6
    assert result["easy"]["map"] == pytest.approx(1 / 6)
    assert result["easy"]["mp@5"] == pytest.approx(1 / 3)
    assert result["easy"]["mp@1"] == 0.0
    assert result["hard"]["num_queries"] == 1  # query 0 is left out of the hard mean, not counted as 0
    assert result["hard"]["map"] == pytest.approx(1.0)


def _reference(scores: np.ndarray, gnd: list[dict], kappas: tuple[int, ...]) -> dict:
    """The protocol written the plain way: full stable argsort, then the reference evaluator's shift loop."""
    protocols = {"easy": (["easy"], ["junk", "hard"]), "medium": (["easy", "hard"], ["junk"]),
                 "hard": (["hard"], ["junk", "easy"])}
    out = {}
    for name, (pos_keys, junk_keys) in protocols.items():
        aps, prs = [], []
        for q, g in enumerate(gnd):
            ok = np.concatenate([np.asarray(g[k], dtype=int) for k in pos_keys])
            if len(ok) == 0:
                continue
            junk = np.concatenate([np.asarray(g[k], dtype=int) for k in junk_keys])
            order = np.argsort(-scores[q], kind="stable")
            pos = np.flatnonzero(np.isin(order, ok))
            junk_pos = np.flatnonzero(np.isin(order, junk))
            shift, ij = 0, 0
            for i in range(len(pos)):
                while ij < len(junk_pos) and pos[i] > junk_pos[ij]:
                    shift, ij = shift + 1, ij + 1
                pos[i] -= shift
            ap = 0.0
            for j, r in enumerate(pos):
                ap += ((1.0 if r == 0 else j / r) + (j + 1) / (r + 1)) / (2 * len(ok))
            aps.append(ap)
            prs.append([(pos + 1 <= min(k, pos.max() + 1)).sum() / min(k, pos.max() + 1) for k in kappas])
        out[name] = [np.mean(aps), *np.mean(prs, axis=0)]
    return out


def test_chunked_counting_matches_a_full_sort_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=(6, 50)), 1)  # many exact ties: ranked by database index
    gnd = []
    for _ in range(6):
        items = rng.permutation(50)
        gnd.append({"easy": items[:4], "hard": items[4:7], "junk": items[7:10]})
    gnd[2]["hard"] = np.array([], dtype=int)
    expected = _reference(scores, gnd, (1, 5, 10))
    for chunk_size in (7, 50):
        result = revisited_metrics(torch.from_numpy(scores), gnd, chunk_size=chunk_size)
        for protocol, values in expected.items():
            got = [result[protocol][m] for m in ("map", "mp@1", "mp@5", "mp@10")]
            assert got == pytest.approx(values, abs=1e-12)


def test_search_with_distractor_chunks_equals_the_full_matrix() -> None:
    torch.manual_seed(0)
    queries, database = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(20, 8), dim=1)
    distractors = F.normalize(torch.randn(30, 8), dim=1)
    gnd = [{"easy": [q, q + 4], "hard": [q + 8], "junk": [q + 12]} for q in range(4)]
    full = revisited_metrics(queries @ torch.cat([database, distractors]).T, gnd)
    chunked = search_metrics(queries, database, gnd, distractors.split(7), chunk_size=6)
    assert chunked == full
    assert full != revisited_metrics(queries @ database.T, gnd)  # the distractors change the result

    produced: list[weakref.ref] = []

    def one_chunk_at_a_time():
        for chunk in distractors.split(7):
            chunk = chunk.clone()
            assert len(produced) < 2 or produced[-2]() is None  # the chunk before the last one is freed
            produced.append(weakref.ref(chunk))
            yield chunk
            del chunk

    assert search_metrics(queries, database, gnd, one_chunk_at_a_time(), chunk_size=6) == full
    assert len(produced) == 5
    table = format_revisited_table({"roxford5k": full})
    assert f"{100 * full['medium']['map']:.2f}" in table and "mP@10" in table


def test_metric_refuses_bad_gnd() -> None:
    with pytest.raises(ValueError, match="outside the database"):
        revisited_metrics(np.zeros((1, 3)), one_query(easy=[3]))
    with pytest.raises(ValueError, match="has no junk"):
        revisited_metrics(np.zeros((1, 3)), [{"easy": [0], "hard": []}])


# ---------------------------------------------------------------------------------------------------------------------
# The reader, the crop, the distractors


def test_reader_reads_the_official_layout(tmp_path: Path) -> None:
    content = write_revisited(tmp_path)
    bench = read_revisited(tmp_path, "roxford5k")
    assert [p.name for p in bench.database] == [f"{n}.jpg" for n in content["imlist"]]
    assert [p.name for p in bench.queries] == [f"{n}.jpg" for n in content["qimlist"]]
    assert not set(bench.queries) & set(bench.database)
    assert bench.boxes == [tuple(g["bbx"]) for g in content["gnd"]]
    assert [g["hard"].tolist() for g in bench.gnd] == [g["hard"].tolist() for g in content["gnd"]]
    assert bench.search_database == bench.database


def test_distractors_are_appended_after_the_database(tmp_path: Path) -> None:
    content = write_revisited(tmp_path)
    listing = write_distractors(tmp_path / "r1m", 3)
    bench = read_revisited(tmp_path, "roxford5k", distractors=listing)
    assert bench.search_database[: len(content["imlist"])] == bench.database
    assert [p.name for p in bench.search_database[len(content["imlist"]):]] == ["d0.jpg", "d1.jpg", "d2.jpg"]
    assert [g["easy"].tolist() for g in bench.gnd] == [g["easy"].tolist() for g in content["gnd"]]


def test_queries_are_cropped_then_scaled_like_their_full_image(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)
    path = tmp_path / "q.png"
    Image.fromarray(pixels).save(path)
    box = (20.0, 10.0, 120.0, 60.0)
    crop = Image.fromarray(pixels).crop((20, 10, 120, 60))
    shrunk = LandmarkImages([path], 100, torch.tensor, boxes=[box]).load(0)  # full image 200 -> 100: factor 1/2
    assert shrunk.size == (50, 25)
    assert np.array_equal(np.asarray(shrunk), np.asarray(crop.resize((50, 25), Image.Resampling.LANCZOS)))
    kept = LandmarkImages([path], 1000, torch.tensor, boxes=[box]).load(0)  # never upscaled
    assert np.array_equal(np.asarray(kept), np.asarray(crop))
    full = LandmarkImages([path], 150, torch.tensor).load(0)
    assert full.size == (150, 75)


def _rewrite_gnd(root: Path, change) -> None:
    path = root / "roxford5k" / "gnd_roxford5k.pkl"
    content = pickle.loads(path.read_bytes())
    change(content)
    path.write_bytes(pickle.dumps(content))


class _RunsCode:
    def __reduce__(self):
        return (print, ("pickle ran code",))


@pytest.mark.parametrize(("breakage", "message"), [
    (lambda root: _rewrite_gnd(root, lambda c: c.pop("qimlist")), "has no qimlist"),
    (lambda root: _rewrite_gnd(root, lambda c: c["gnd"][1].pop("junk")), "gnd[1] has no junk"),
    (lambda root: _rewrite_gnd(root, lambda c: c["gnd"][0].update(bbx=[0.0, 0.0, 500.0, 10.0])),
     "is outside the 64x48 image"),
    (lambda root: next((root / "roxford5k" / "jpg").glob("*_1_*.jpg")).unlink(), "does not exist"),
    (lambda root: (root / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(_RunsCode())), "refusing"),
    (lambda root: _rewrite_gnd(root, lambda c: c["imlist"].append(c["imlist"][2])),
     "imlist[14] names roxford5k_0_2.jpg a second time"),
    (lambda root: _rewrite_gnd(root, lambda c: [g.update(easy=[], hard=np.array([])) for g in c["gnd"]]),
     "no query has a positive"),
])
def test_bad_files_are_one_line_errors(tmp_path: Path, breakage, message: str) -> None:
    write_revisited(tmp_path)
    breakage(tmp_path)
    with pytest.raises(RecallkUsageError, match=None) as error:
        read_revisited(tmp_path, "roxford5k")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_distractor_list_and_listed_image(tmp_path: Path) -> None:
    write_revisited(tmp_path)
    with pytest.raises(RecallkUsageError, match="distractor list .* does not exist"):
        read_revisited(tmp_path, "roxford5k", distractors=tmp_path / "nope.txt")
    listing = write_distractors(tmp_path / "r1m", 2)
    (tmp_path / "r1m" / "jpg" / "d1.jpg").unlink()
    with pytest.raises(RecallkUsageError, match="d1.jpg listed in distractor list"):
        read_revisited(tmp_path, "roxford5k", distractors=listing)


def test_unreadable_images_are_refused_first_or_left_out(tmp_path: Path) -> None:
    content = write_revisited(tmp_path)
    listing = write_distractors(tmp_path / "r1m", 3)
    jpg = tmp_path / "roxford5k" / "jpg"
    (jpg / f"{content['qimlist'][1]}.jpg").write_bytes(b"<html>not found</html>")  # a garbage query JPEG
    with pytest.raises(RecallkUsageError) as error:
        read_revisited(tmp_path, "roxford5k", distractors=listing)
    assert "\n" not in str(error.value) and "1 of 20 roxford5k images cannot be read" in str(error.value)
    assert f"{content['qimlist'][1]}.jpg (cannot identify image file" in str(error.value)
    assert "--skip-bad-images" in str(error.value)

    bad_database = content["gnd"][0]["easy"][1]  # a positive of query 0, with database images after it
    (jpg / f"{content['imlist'][bad_database]}.jpg").write_bytes(b"")
    (tmp_path / "r1m" / "jpg" / "d1.jpg").write_bytes(b"\xff\xd8 truncated")
    bench = read_revisited(tmp_path, "roxford5k", distractors=listing, skip_bad_images=True)
    assert [p.name for p in bench.distractors] == ["d0.jpg", "d2.jpg"]
    kept_queries = [0, 2]
    assert [p.stem for p in bench.queries] == [content["qimlist"][q] for q in kept_queries]
    assert bench.boxes == [tuple(content["gnd"][q]["bbx"]) for q in kept_queries]
    assert [p.stem for p in bench.database] == [n for i, n in enumerate(content["imlist"]) if i != bad_database]
    for entry, q in zip(bench.gnd, kept_queries):  # the same images by name, without the one left out
        for key in ("easy", "hard", "junk"):
            expected = [content["imlist"][i] for i in content["gnd"][q][key] if i != bad_database]
            assert [bench.database[i].stem for i in entry[key]] == expected


# ---------------------------------------------------------------------------------------------------------------------
# Descriptors


def cirtorch_extract_ms(net: torch.nn.Module, image: torch.Tensor, ms: list[float], msp: float) -> np.ndarray:
    """cirtorch's ``extract_ms``, written out: per scale the image tensor is resized with
    ``interpolate(scale_factor=s, mode='bilinear', align_corners=False)`` (scale 1: the image), the network's
    descriptors are summed as ``v^msp``, divided by the number of scales, raised to ``1/msp`` and L2-normalised."""
    v = np.zeros(net(image[None]).shape[1])
    with torch.no_grad():
        for s in ms:
            x = image[None] if s == 1 else F.interpolate(image[None], scale_factor=s, mode="bilinear",
                                                         align_corners=False)
            v += net(x)[0].double().numpy() ** msp
    v = (v / len(ms)) ** (1 / msp)
    return v / np.linalg.norm(v)


def test_multiscale_descriptor_is_cirtorchs_extract_ms() -> None:
    """A recallk head projects after GeM (LayerNorm -> Linear), so cirtorch's msp is 1: the mean of the per-scale
    descriptors, resized as cirtorch resizes (floor of the scaled size, bilinear, no antialiasing)."""
    torch.manual_seed(0)
    model = create_model("omniglot_cnn", embed_dim=6, pooling="gem", gem_p=3.0, in_chans=3, widths=(4, 8)).eval()
    images = [torch.rand(3, 30, 44), torch.rand(3, 25, 19)]
    scales = (1.0, 1 / math.sqrt(2), 0.5)
    got = multiscale_descriptors(model, images, torch.device("cpu"), scales, progress=False)
    for image, descriptor in zip(images, got):
        np.testing.assert_allclose(descriptor.numpy(), cirtorch_extract_ms(model, image, list(scales), 1), atol=1e-6)
    # one image at a time: nothing of another image (or padding) enters a descriptor
    alone = multiscale_descriptors(model, images[1:], torch.device("cpu"), scales, progress=False)
    torch.testing.assert_close(alone[0], got[1])
    assert rescale(images[0], 0.5).shape == (3, 15, 22) and rescale(images[0], 1 / math.sqrt(2)).shape == (3, 21, 31)
    with pytest.raises(ValueError, match="scale 0.01 leaves no pixel of a 30x44 image"):
        rescale(images[0], 0.01)


def test_multiscale_power_is_cirtorchs_msp() -> None:
    """With cirtorch's msp = p (a GeM network without projection, here GeM pooling alone): sum of v^p, ^(1/p)."""
    torch.manual_seed(0)
    gem = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(), GeM(3.0), torch.nn.Flatten(),
                              Normalize()).eval()
    image = torch.rand(3, 30, 44)
    got = multiscale_descriptors(gem, [image], torch.device("cpu"), (1.0, 0.5), p=3.0, progress=False)
    np.testing.assert_allclose(got[0].numpy(), cirtorch_extract_ms(gem, image, [1.0, 0.5], 3.0), atol=1e-6)


class Normalize(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


def test_multiscale_post_process_applies_after_the_scales() -> None:
    torch.manual_seed(0)
    model = create_model("omniglot_cnn", embed_dim=6, pooling="avg", in_chans=3, widths=(4, 8)).eval()
    image = torch.rand(3, 24, 24)
    projection = torch.randn(6, 4)
    got = multiscale_descriptors(model, [image], torch.device("cpu"), (1.0, 0.5), progress=False,
                                 post_process=lambda d: d @ projection)
    aggregated = torch.from_numpy(cirtorch_extract_ms(model, image, [1.0, 0.5], 1)).float()
    torch.testing.assert_close(got[0], F.normalize(aggregated @ projection, dim=0))


@pytest.mark.parametrize("text", ["1 0.7071067811865476 0.5", "[1, 1/2**(1/2), 1/2]", "[1, 1 / 2 ** (1 / 2), 0.5]",
                                  "1,2**-0.5,.5"])
def test_scales_in_recallk_and_cirtorch_spelling(text: str) -> None:
    assert parse_scales(text) == pytest.approx((1.0, 2 ** -0.5, 0.5))


@pytest.mark.parametrize("text", ["[1, __import__('os').getcwd()]", "1 -0.5", "1 0", "[]", "1 x", "10**10**10",
                                  "1/0"])
def test_scales_refuse_what_is_not_a_positive_number(text: str) -> None:
    with pytest.raises(ValueError, match="not a positive number|no scales"):
        parse_scales(text)


def test_descriptor_cache_computes_only_the_missing_chunks(tmp_path: Path) -> None:
    from recallk.evaluation.descriptor_cache import DescriptorCache

    paths = [tmp_path / f"{i}.jpg" for i in range(7)]
    values = torch.arange(7.0)[:, None].repeat(1, 3)
    asked: list[list[int]] = []

    def compute(indices):
        asked.append(list(indices))
        for start in range(0, len(indices), 3):
            yield values[list(indices[start:start + 3])]

    first = DescriptorCache(tmp_path / "cache", "model A", chunk_size=3)
    assert torch.equal(torch.cat(list(first.descriptors(paths, compute))), values)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3  # chunks of 3, 3 and 1 images
    first.files[1].unlink()  # as if interrupted while computing the middle chunk
    again = DescriptorCache(tmp_path / "cache", "model A", chunk_size=3)
    assert torch.equal(torch.cat(list(again.descriptors(paths, compute))), values)
    other = DescriptorCache(tmp_path / "cache", "model B", chunk_size=3)  # other settings: nothing is reused
    assert torch.equal(torch.cat(list(other.descriptors(paths, compute))), values)
    assert asked == [list(range(7)), [3, 4, 5], list(range(7))]
    again.discard()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3  # model B's are not this cache's to remove
    other.discard()
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------------------------------
# End to end


def test_evaluate_command_on_a_benchmark(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from recallk.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    data = tmp_path / "data"
    write_revisited(data)
    listing = write_distractors(tmp_path / "r1m", 3)
    (run / "evaluation.json").write_text(json.dumps({"test": {"recall@1": 0.5}}))

    assert main(["evaluate", str(run), "--benchmark", "roxford5k", "--data-dir", str(data), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "protocol" in printed and "mP@10" in printed and "medium" in printed
    result = subprocess.run(  # the real command line, once
        [sys.executable, "-m", "recallk", "evaluate", str(run), "--benchmark", "roxford5k", "--data-dir", str(data),
         "--device", "cpu", "--distractors", str(listing), "--scales", "1", "0.5"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    single = "roxford5k (best.pt, 1024 px, scales 1, whitening none)"
    with_distractors = "roxford5k+distractors (best.pt, 1024 px, scales 1 0.5, whitening none)"
    saved = json.loads((run / "evaluation.json").read_text())
    assert list(saved) == ["test", single, with_distractors]  # earlier entries kept
    assert saved[single]["database"] == 14 and saved[single]["distractors"] == 0
    assert saved[with_distractors]["distractors"] == 3 and saved[with_distractors]["scales"] == [1, 0.5]
    for protocol in ("easy", "medium", "hard"):
        assert 0 <= saved[single][protocol]["map"] <= 1 and saved[single][protocol]["num_queries"] == 3
    assert f"{100 * saved[with_distractors]['hard']['map']:.2f}" in result.stdout
    text = (run / "evaluation.txt").read_text()
    assert "recall@1" in text and "roxford5k+distractors (best.pt" in text

    # other settings are other entries: a multi-scale evaluation leaves the single-scale one as it was
    assert main(["evaluate", str(run), "--benchmark", "roxford5k", "--data-dir", str(data), "--device", "cpu",
                 "--scales", "[1, 1/2**(1/2)]"]) == 0
    updated = json.loads((run / "evaluation.json").read_text())
    multi = "roxford5k (best.pt, 1024 px, scales 1 0.707107, whitening none)"
    assert list(updated) == ["test", single, with_distractors, multi] and updated[single] == saved[single]
    assert updated[multi]["scales"] == pytest.approx([1, 2 ** -0.5])
    assert main(["evaluate", str(run / "checkpoints" / "last.pt"), "--benchmark", "roxford5k", "--data-dir",
                 str(data), "--device", "cpu", "--out", str(run / "evaluation.json")]) == 0
    assert "roxford5k (last.pt, 1024 px, scales 1, whitening none)" in json.loads((run / "evaluation.json").read_text())

    assert main(["evaluate", str(run), "--benchmark", "rparis6k", "--data-dir", str(data)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "gnd_rparis6k.pkl does not exist" in error
    assert main(["evaluate", str(run), "--benchmark", "roxford5k", "--data-dir", str(data), "--distractors",
                 str(tmp_path / "x.txt")]) == 2
    assert "distractor list" in capsys.readouterr().err


def test_benchmarks_evaluated_at_the_end_of_training(tmp_path: Path) -> None:
    from recallk.training.preflight import preflight
    from recallk.training.trainer import train

    from data_fixtures import make_glyph_folder
    from run_fixtures import tiny_config

    data = make_glyph_folder(tmp_path / "data", classes=8, per_class=2)
    write_revisited(data)
    config = tiny_config(tmp_path / "runs", train__epochs=1, eval__benchmarks=["roxford5k"], eval__scales=[1, 0.5],
                         output__plots=False, output__export_embeddings=False)
    with pytest.raises(RecallkUsageError, match="gnd_rparis6k.pkl does not exist"):  # also what --dry-run runs
        preflight(dataclasses.replace(config, eval=dataclasses.replace(config.eval, benchmarks=("rparis6k",))), data)
    summary = train(config, tmp_path / "run", data_dir=data, progress=False)
    assert set(summary["benchmarks"]["roxford5k"]) >= {"easy", "medium", "hard"}
    assert summary["benchmarks"]["roxford5k"]["scales"] == [1.0, 0.5]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["benchmarks"] == json.loads(json.dumps(summary["benchmarks"]))
