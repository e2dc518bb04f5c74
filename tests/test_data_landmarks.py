"""The landmark training-set readers (SfM-120k, GLDv2 clean) on fixtures in their official on-disk formats."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recallk.config import config_from_dict
from recallk.data import build_dataset
from recallk.data.landmarks import sfm120k_image, sfm120k_pairs
from recallk.data.sources import build_source

from data_fixtures import make_gldv2, make_sfm120k


def test_sfm120k_reads_cirtorch_layout_and_drops_small_clusters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = make_sfm120k(tmp_path, {"train": {7: 3, 2: 4, 9: 1}, "val": {5: 2, 6: 2}})
    with caplog.at_level(logging.WARNING, logger="recallk.data.landmarks"):
        train = build_dataset("sfm120k", tmp_path, "train", min_images=2)  # the data root: train/retrieval-SfM-120k
    assert "SfM-120k train: dropped 1 of 3 landmarks (1 images) with fewer than 2 images" in caplog.text
    assert len(train) == 7 and train.class_names == ["2", "7"]
    assert train.labels.tolist() == [1, 1, 1, 0, 0, 0, 0]  # cluster 7 listed first, numbered after cluster 2
    cid = train.item_ids[0].rsplit("/", 1)[1]
    assert train.item_ids[0] == f"{cid[-2:]}/{cid[-4:-2]}/{cid[-6:-4]}/{cid}" == sfm120k_image(cid)
    assert (folder / "ims" / train.item_ids[0]).is_file()
    image, label = train[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1
    assert build_dataset("sfm120k", folder, "val").num_classes == 2  # the folder itself


def test_sfm120k_min_images_defaults_to_samples_per_class(tmp_path: Path) -> None:
    make_sfm120k(tmp_path, {"train": {1: 2, 2: 4, 3: 4}, "val": {5: 2}})
    config = config_from_dict({"data": {"dataset": "sfm120k", "samples_per_class": 4, "num_workers": 0}})
    assert build_source(config.data, "train", True, tmp_path).num_classes == 2  # cluster 1 (2 images) dropped
    options = config_from_dict({"data": {"dataset": "sfm120k", "samples_per_class": 4, "options": {"min_images": 1}}})
    assert build_source(options.data, "train", True, tmp_path).num_classes == 3


def test_sfm120k_pairs_of_val_and_whiten_parts(tmp_path: Path) -> None:
    folder = make_sfm120k(tmp_path, {"train": {1: 2}, "val": {5: 3, 6: 2}}, whiten=True)
    db = pickle.loads((folder / "retrieval-SfM-120k.pkl").read_bytes())["val"]
    for part in ("val", "whiten"):
        base, names, pairs = sfm120k_pairs(tmp_path, part)
        assert base == folder / "ims" and pairs.shape == (3, 2) and pairs.dtype == np.int64
        expected = [(sfm120k_image(db["cids"][q]), sfm120k_image(db["cids"][p])) for q, p in
                    zip(db["qidxs"], db["pidxs"])]
        assert [(names[q], names[p]) for q, p in pairs] == expected
        assert all((base / n).is_file() for n in names)


def test_sfm120k_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"retrieval-SfM-120k.pkl not found .* download http://cmp"):
        build_dataset("sfm120k", tmp_path, "train")
    folder = make_sfm120k(tmp_path, {"train": {1: 2}, "val": {2: 2}})
    with pytest.raises(ValueError, match="no landmark has 3 images; lower data.options.min_images"):
        build_dataset("sfm120k", tmp_path, "val", min_images=3)
    with pytest.raises(FileNotFoundError, match=r"retrieval-SfM-120k-whiten.pkl not found; download"):
        sfm120k_pairs(tmp_path, "whiten")
    (folder / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps({"train": {"cids": ["abcdef01"]}}))
    with pytest.raises(ValueError, match=r"part 'train' lacks cluster, qidxs, pidxs"):
        build_dataset("sfm120k", tmp_path, "train")
    (folder / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps({"train": Path("x")}))  # not plain data
    with pytest.raises(ValueError, match="refusing to build pathlib"):
        build_dataset("sfm120k", tmp_path, "train")


def test_gldv2_clean_csv_tree_and_held_out_landmarks(tmp_path: Path) -> None:
    folder = make_gldv2(tmp_path, {12: 3, 4: 2, 30: 1, 8: 2})
    full = build_dataset("gldv2", tmp_path, "train", min_images=2)
    assert full.class_names == ["4", "8", "12"] and len(full) == 7
    first = full.item_ids[0]
    image_id = first.rsplit("/", 1)[1].removesuffix(".jpg")
    assert first == f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"
    assert (folder / "train" / first).is_file() and full[0][0].mode == "RGB"
    train = build_dataset("gldv2", folder, "train", min_images=2, val_landmarks=1)
    val = build_dataset("gldv2", folder, "val", min_images=2, val_landmarks=1)
    assert val.num_classes == 1 and train.num_classes == 2
    assert set(train.class_names).isdisjoint(val.class_names) and len(train) + len(val) == 7
    with pytest.raises(ValueError, match="no val split unless data.options.val_landmarks > 0"):
        build_dataset("gldv2", folder, "val")
    (folder / "train_clean.csv").write_text("id,url\n1,x\n")
    with pytest.raises(ValueError, match="expected the header 'landmark_id,images'"):
        build_dataset("gldv2", folder, "train")
    with pytest.raises(FileNotFoundError, match="train_clean.csv not found .*github.com/cvdfoundation"):
        build_dataset("gldv2", tmp_path / "elsewhere", "train")
