"""Tiny on-disk data sets in the exact official formats, for the tests of ``recallk.data``.

Every builder writes real image files with Pillow (8x8 pixels; the colour encodes the class) and real list files
into a folder, and returns what a reader should find.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def write_image(path: Path, value: int = 128, fmt: str | None = None) -> Path:
    """A real 8x8 RGB image of grey level ``value`` at ``path`` (format from the suffix unless ``fmt``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path, format=fmt)
    return path


def write_corrupt_image(path: Path) -> Path:
    """Bytes that no image decoder accepts, under an image name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image" * 10)
    return path


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_sop(root: Path) -> Path:
    """Stanford Online Products: train classes 1-2 (3 images each), test classes 3-5 (2 each)."""
    for split, classes, per in (("train", (1, 2), 3), ("test", (3, 4, 5), 2)):
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            for k in range(per):
                rel = f"bicycle_final/{c}_{k}.JPG"
                write_image(root / rel, value=20 * c, fmt="JPEG")
                lines.append(f"{len(lines)} {c} 1 {rel}")
        (root / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_cub(root: Path) -> Path:
    """CUB-200-2011 with classes 1, 2 (train half) and 101, 102 (test half), 2 images each."""
    images, labels = [], []
    for c in (1, 2, 101, 102):
        for k in range(2):
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{k}.jpg"
            write_image(root / "images" / rel, value=c)
            images.append(f"{len(images) + 1} {rel}")
            labels.append(f"{len(labels) + 1} {c}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def make_cars(root: Path) -> Path:
    """Cars196 ``cars_annos.mat`` (a MATLAB struct array) with classes 1, 2 (train) and 99, 100 (test)."""
    from scipy.io import savemat

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    rows = []
    for c in (1, 2, 99, 100):
        for k in range(2):
            rel = f"car_ims/{len(rows) + 1:06d}.jpg"
            write_image(root / rel, value=c)
            rows.append((rel, 1, 1, 8, 8, c, k))
    annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        annotations[0, i] = row
    class_names = np.array([f"Car model {c}" for c in range(1, 197)], dtype=object).reshape(1, -1)
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return root


def make_inat(root: Path) -> Path:
    """iNaturalist 2018 with Smooth-AP split files: train classes Plantae/10, Aves/20; test Insecta/30."""
    splits = {"train": ["Plantae/10", "Aves/20"], "test": ["Insecta/30"]}
    (root / "Inat_dataset_splits").mkdir(parents=True, exist_ok=True)
    for split, classes in splits.items():
        lines = []
        for c in classes:
            for k in range(2):
                rel = f"train_val2018/{c}/{k:032x}.jpg"
                write_image(root / rel)
                lines.append(rel)
        (root / "Inat_dataset_splits" / f"Inaturalist_{split}_set1.txt").write_text("\n".join(lines) + "\n")
    return root


def make_vehicleid(root: Path) -> Path:
    """PKU VehicleID: train ids 1, 2; test lists 800/1600/2400 holding 1, 2 and 3 vehicles (ids 7, 8, 9)."""
    (root / "train_test_split").mkdir(parents=True, exist_ok=True)
    lists = {"train_list.txt": [1, 2], "test_list_800.txt": [7], "test_list_1600.txt": [7, 8],
             "test_list_2400.txt": [7, 8, 9]}
    for file_name, ids in lists.items():
        lines = []
        for vid in ids:
            for k in range(2):
                name = f"{vid:04d}{k:03d}"
                write_image(root / "image" / f"{name}.jpg", value=vid)
                lines.append(f"{name} {vid}")
        (root / "train_test_split" / file_name).write_text("\n".join(lines) + "\n")
    return root


def make_inshop(root: Path) -> Path:
    """DeepFashion In-Shop: ``Eval/list_eval_partition.txt`` and images in ``Img/img/...``.

    Train items id_01, id_02; query items id_03, id_04; gallery items id_03, id_04, id_05 (gallery-only item).
    """
    rows = []
    plan = [("id_01", "train"), ("id_01", "train"), ("id_02", "train"), ("id_02", "train"),
            ("id_03", "query"), ("id_03", "gallery"), ("id_04", "query"), ("id_04", "gallery"),
            ("id_04", "gallery"), ("id_05", "gallery")]
    for k, (item, status) in enumerate(plan):
        name = f"img/WOMEN/Dresses/{item}/{k:02d}_1_front.jpg"
        write_image(root / "Img" / name)
        rows.append(f"{name} {item} {status}")
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    header = [str(len(rows)), "image_name item_id evaluation_status"]
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(header + rows) + "\n")
    return root


def make_folder(root: Path, split: str = "train") -> Path:
    """``<root>/<split>/<class>/`` with classes cat (2 images + one in a subfolder) and dog (2 images)."""
    for cls in ("cat", "dog"):
        for k in range(2):
            write_image(root / split / cls / f"{k}.png")
    write_image(root / split / "cat" / "more" / "2.JPEG", fmt="JPEG")
    (root / split / "dog" / "notes.txt").write_text("not an image")
    return root


def make_csv(root: Path, split: str = "train") -> Path:
    """``<root>/<split>.csv`` listing 4 images in ``pics/`` with labels 10 and 2 (numeric order: 2 < 10)."""
    lines = ["path,label"]
    for k, label in enumerate((10, 10, 2, 2)):
        write_image(root / "pics" / f"{k}.png")
        lines.append(f"pics/{k}.png,{label}")
    (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def omniglot_png(value: int = 0) -> bytes:
    """A 105x105 1-bit Omniglot-like PNG: white (1) background with a black (0) ink square."""
    image = Image.new("1", (105, 105), 1)
    image.paste(0, (40, 40, 60 + value % 20, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def omniglot_layout(part: str, alphabets: dict[str, int], drawings: int) -> dict[str, bytes]:
    """Member names -> PNG bytes for ``<part>/<Alphabet>/characterNN/NNNN_DD.png``."""
    files = {}
    for alphabet, characters in alphabets.items():
        for c in range(1, characters + 1):
            for d in range(1, drawings + 1):
                files[f"{part}/{alphabet}/character{c:02d}/{c:04d}_{d:02d}.png"] = omniglot_png(c + d)
    return files


def make_omniglot_zip(
    folder: Path, part: str = "images_background", alphabets: dict[str, int] | None = None, drawings: int = 3,
    empty_class: bool = False,
) -> Path:
    """``<folder>/<part>.zip`` like the official archive (with directory entries); optionally one empty class."""
    alphabets = alphabets or {"Alpha": 3, "Beta": 2}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{part}.zip"
    with zipfile.ZipFile(path, "w") as archive:
        written_dirs = set()
        for name, data in omniglot_layout(part, alphabets, drawings).items():
            pieces = name.split("/")
            for depth in range(1, 4):
                directory = "/".join(pieces[:depth]) + "/"
                if directory not in written_dirs:
                    archive.writestr(directory, b"")
                    written_dirs.add(directory)
            archive.writestr(name, data)
        if empty_class:
            archive.writestr(f"{part}/Alpha/character99/", b"")
    return path


def make_omniglot_folder(
    folder: Path, part: str = "images_background", alphabets: dict[str, int] | None = None, drawings: int = 3
) -> Path:
    """The extracted form ``<folder>/<part>/<Alphabet>/characterNN/*.png``."""
    for name, data in omniglot_layout(part, alphabets or {"Alpha": 3, "Beta": 2}, drawings).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder / part


def write_glyphs(root: Path, classes: range, per_class: int = 4, size: int = 20, seed: int = 0) -> Path:
    """``root/class<c>/<i>.png``: each class three thick strokes, jittered per drawing (like Omniglot)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        _write_glyph_class(root / f"class{c:02d}", rng, per_class, size)
    return root


def _write_glyph_class(folder: Path, rng: np.random.Generator, per_class: int, size: int) -> None:
    """``per_class`` drawings ``folder/<i>.png`` of one class: three thick strokes, jittered per drawing."""
    strokes = rng.uniform(3, size - 3, (3, 4))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        image = Image.new("L", (size, size), 255)
        draw = ImageDraw.Draw(image)
        for x0, y0, x1, y1 in strokes + rng.normal(0, 1.0, strokes.shape):
            draw.line((x0, y0, x1, y1), fill=0, width=2)
        image.save(folder / f"{i}.png")


def make_glyph_folder(root: Path, classes: int = 12, per_class: int = 6, size: int = 24) -> Path:
    """A class-per-folder tree of glyphs: each class three thick strokes, jittered per drawing (like Omniglot)."""
    rng = np.random.default_rng(0)
    for split, first in (("train", 0), ("test", classes)):
        for c in range(first, first + classes):
            _write_glyph_class(root / split / f"class{c:02d}", rng, per_class, size)
    return root


SENTENCES = {
    "book_flight": ["book a flight to paris", "i need a plane ticket", "flights to rome please", "fly me to london",
                    "get me on a plane to oslo", "reserve a seat on a flight"],
    "weather": ["what's the weather", "is it raining today", "forecast for tomorrow", "will it snow tonight",
                "how hot is it outside", "do i need an umbrella"],
    "play_music": ["play some jazz", "put on music", "start my playlist", "play a song by queen",
                   "i want to hear rock", "shuffle my favourites"],
    "volume_up": ["turn the volume up", "louder please", "increase the volume", "make it louder",
                  "raise the sound", "volume up a bit"],
    "set_alarm": ["wake me at seven", "set an alarm for 6am", "alarm for tomorrow morning", "set my alarm",
                  "remind me to wake up at 8", "i need an alarm at noon"],
    "bank_balance": ["how much money do i have", "what's my balance", "check my account balance",
                     "show my savings", "balance of my checking account", "how much is in my account"],
}


def write_clinc_fixture(root: Path) -> None:
    """A data_full.json in CLINC150's layout: 6 intents, 3 train / 2 val / 2 test sentences each, plus oos."""
    data: dict[str, list] = {"train": [], "val": [], "test": [], "oos_train": [["hi", "oos"]], "oos_val": [],
                             "oos_test": []}
    for intent, texts in SENTENCES.items():
        data["train"] += [[t, intent] for t in texts[:3]]
        data["val"] += [[t, intent] for t in texts[3:5]]
        data["test"] += [[t, intent] for t in texts[4:6]]
    (root / "clinc150").mkdir(parents=True)
    (root / "clinc150" / "data_full.json").write_text(json.dumps(data))


def write_banking_fixture(root: Path) -> None:
    (root / "banking77").mkdir(parents=True)
    for part, rows in (("train", slice(0, 4)), ("test", slice(4, 6))):
        with (root / "banking77" / f"{part}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "category"])
            for intent, texts in SENTENCES.items():
                writer.writerows([t, intent] for t in texts[rows])


def landmark_image(path: Path, cluster: int, rng: np.random.Generator, size: int = 8) -> Path:
    """A JPEG (whatever the name) of a landmark: a colour set by ``cluster`` with per-image noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base = np.array([(37 * cluster) % 256, (91 * cluster) % 256, (53 * cluster + 100) % 256], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path, format="JPEG")
    return path


def make_sfm120k(
    root: Path, parts: dict[str, dict[int, int]], size: int = 8, seed: int = 0, whiten: bool = False
) -> Path:
    """cirtorch's layout: ``root/train/retrieval-SfM-120k/{retrieval-SfM-120k.pkl, ims/}``.

    ``parts`` maps ``train``/``val`` to ``{cluster: images}``. Each image is a JPEG without suffix at
    ``ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``; the pairs join consecutive images of a cluster. With
    ``whiten``, ``retrieval-SfM-120k-whiten.pkl`` holds the val part's cids and pairs (top level, as cirtorch's).
    Returns the data set folder.
    """
    import pickle

    rng = np.random.default_rng(seed)
    folder = root / "train" / "retrieval-SfM-120k"
    db: dict[str, dict[str, list]] = {}
    for part, clusters in parts.items():
        cids, cluster_of, queries, positives = [], [], [], []
        for cluster, count in clusters.items():
            for i in range(count):
                cid = hashlib.md5(f"{part}-{cluster}-{i}".encode()).hexdigest()
                landmark_image(folder / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid, cluster, rng, size)
                if i > 0:
                    queries.append(len(cids) - 1)
                    positives.append(len(cids))
                cids.append(cid)
                cluster_of.append(cluster)
        db[part] = {"cids": cids, "cluster": cluster_of, "qidxs": queries, "pidxs": positives}
    with open(folder / "retrieval-SfM-120k.pkl", "wb") as f:
        pickle.dump(db, f)
    if whiten:
        val = db["val"]
        with open(folder / "retrieval-SfM-120k-whiten.pkl", "wb") as f:
            pickle.dump({"cids": val["cids"], "qidxs": val["qidxs"], "pidxs": val["pidxs"]}, f)
    return folder


def make_gldv2(root: Path, landmarks: dict[int, int], seed: int = 0) -> Path:
    """GLDv2 clean: ``root/gldv2/train_clean.csv`` and ``train/a/b/c/<id>.jpg`` for ``{landmark_id: images}``."""
    rng = np.random.default_rng(seed)
    folder = root / "gldv2"
    rows = []
    for landmark, count in landmarks.items():
        ids = [hashlib.sha1(f"{landmark}-{i}".encode()).hexdigest()[:16] for i in range(count)]
        for image_id in ids:
            landmark_image(folder / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg", landmark,
                           rng)
        rows.append([landmark, " ".join(ids)])
    with open(folder / "train_clean.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["landmark_id", "images"])
        writer.writerows(rows)
    return folder
