"""Tests for recallk.evaluation: exact kNN and retrieval metrics."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from recallk.evaluation import exact_knn, retrieval_metrics


def unit_vectors(degrees: list[float]) -> np.ndarray:
    """2-D unit vectors at the given angles: similarity ranks neighbours by angular distance."""
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def clustered(rng: np.random.Generator, class_sizes: np.ndarray, dim: int, first_label: int = 0):
    """L2-normalised embeddings (centre + noise per class) and their labels."""
    labels = np.repeat(np.arange(first_label, first_label + len(class_sizes)), class_sizes)
    centres = rng.normal(size=(len(class_sizes), dim))
    embeddings = centres[labels - first_label] + rng.normal(size=(len(labels), dim))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings.astype(np.float32), labels


def metrics(*args, **kwargs):
    return retrieval_metrics(*args, progress=False, **kwargs)


# Hand-computed cases --------------------------------------------------------------------------------------------


def test_all_vs_all_matches_hand_computation():
    # Angles 0, 10, 25, 60, 100 with labels 0, 0, 1, 0, 1. Ranked neighbours (labels) and positives R:
    # q0: 1,2,3,4 -> 0,1,0,1 (R=2)   q1: 0,2,3,4 -> 0,1,0,1 (R=2)   q2: 1,0,3,4 -> 0,0,0,1 (R=1)
    # q3: 2,4,1,0 -> 1,1,0,0 (R=2)   q4: 3,2,1,0 -> 0,1,0,0 (R=1)
    result = metrics(unit_vectors([0, 10, 25, 60, 100]), np.array([0, 0, 1, 0, 1]), k=(1, 2, 4))
    assert result["recall@1"] == pytest.approx(2 / 5)
    assert result["recall@2"] == pytest.approx(3 / 5)
    assert result["recall@4"] == pytest.approx(1.0)
    assert result["precision@1"] == pytest.approx(2 / 5)
    assert result["r_precision"] == pytest.approx((1 / 2 + 1 / 2) / 5)
    assert result["map@r"] == pytest.approx((1 / 2 + 1 / 2) / 5)
    assert (result["num_queries"], result["num_queries_skipped"]) == (5, 0)


def test_query_vs_references_matches_hand_computation():
    references = unit_vectors([5, 10, 20, 30, 40, 50])
    reference_labels = np.array([1, 0, 0, 2, 0, 1])
    # q0 (0 deg, label 0): neighbour labels 1,0,0,2,0,1, R=3: R-precision 2/3, AP@R (0 + 1/2 + 2/3) / 3 = 7/18.
    # q1 (28 deg, label 2): nearest is 30 deg (label 2), R=1: everything 1.
    # q2 (label 7): absent from the references -> skipped.
    queries = unit_vectors([0, 28, 45])
    result = metrics(queries, np.array([0, 2, 7]), k=(1, 2), ref_embeddings=references, ref_labels=reference_labels)
    assert result["recall@1"] == pytest.approx(1 / 2)
    assert result["recall@2"] == pytest.approx(1.0)
    assert result["r_precision"] == pytest.approx((2 / 3 + 1) / 2)
    assert result["map@r"] == pytest.approx((7 / 18 + 1) / 2)
    assert (result["num_queries"], result["num_queries_skipped"]) == (2, 1)


def test_identical_embeddings_of_different_classes_are_neighbours_not_self():
    # Items 0 and 1 are the same vector with different labels; each must retrieve the other (a miss), not
    # itself: dropping "the first neighbour column" instead would keep item 1 as its own neighbour.
    embeddings = unit_vectors([0, 0, 40, 45])
    result = metrics(embeddings, np.array([0, 1, 0, 1]), k=(1, 2))
    # q0: 1 (miss), 2 (hit)   q1: 0 (miss), 2 (miss)   q2: 3 (miss), 0 (hit; 0 and 1 tie, smaller index first)
    # q3: 2 (miss), 0 (miss)
    assert result["recall@1"] == pytest.approx(0.0)
    assert result["recall@2"] == pytest.approx(2 / 4)
    _, neighbours = exact_knn(torch.from_numpy(embeddings), torch.from_numpy(embeddings), 1, self_index=torch.arange(4))
    assert neighbours[:, 0].tolist() == [1, 0, 3, 2]


def test_identical_embeddings_of_the_same_class_count_once_each():
    # Items 0 and 1 are identical (label 0); item 2 (label 0) is far. Each query has R=2 other positives.
    # q0: 1 (hit), then 3 (label 1, at 50 deg), then 2 (label 0, at 90 deg) -> R-precision 1/2, AP@R 1/2.
    # Only the query itself is left out: its identical copy stays its first neighbour (dropping every item as
    # similar as the query itself would give q0 a miss at rank 1).
    embeddings = unit_vectors([0, 0, 90, 50])
    result = metrics(embeddings, np.array([0, 0, 0, 1]), k=1)
    assert result["num_queries"] == 3 and result["num_queries_skipped"] == 1
    # q1 like q0; q2 (90 deg): 3 (miss, 40 deg), then 0 and 1 (both 90 deg, hits) -> R-precision 1/2, AP@R 1/4.
    assert result["recall@1"] == pytest.approx(2 / 3)
    assert result["r_precision"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 2) / 3)
    assert result["map@r"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 4) / 3)


def test_singleton_class_is_skipped_and_counted():
    result = metrics(unit_vectors([0, 10, 90]), np.array([3, 3, 8]), k=(1, 2))
    assert (result["num_queries"], result["num_queries_skipped"]) == (2, 1)
    assert result["recall@1"] == pytest.approx(1.0)
    assert result["map@r"] == pytest.approx(1.0)


def test_k_larger_than_the_reference_set_uses_every_reference():
    result = metrics(unit_vectors([0, 10, 50]), np.array([0, 1, 0]), k=(1, 100))
    assert result["recall@1"] == pytest.approx(0.0)
    assert result["recall@100"] == pytest.approx(1.0)


# Agreement with pytorch-metric-learning --------------------------------------------------------------------------


def pml_accuracy(queries, query_labels, references=None, reference_labels=None) -> dict[str, float]:
    calculator = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=CustomKNN(DotProductSimilarity(normalize_embeddings=False)),
    )
    return calculator.get_accuracy(queries, query_labels, references, reference_labels)


def assert_matches_pml(ours: dict, reference: dict) -> None:
    np.testing.assert_allclose(
        [ours["precision@1"], ours["r_precision"], ours["map@r"]],
        [reference["precision_at_1"], reference["r_precision"], reference["mean_average_precision_at_r"]],
        rtol=1e-9,
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_all_vs_all_matches_pytorch_metric_learning(seed):
    rng = np.random.default_rng(seed)
    embeddings, labels = clustered(rng, rng.integers(1, 25, size=30), dim=8)  # unequal sizes, some singletons
    ours = metrics(embeddings, labels, chunk_size=37)
    assert_matches_pml(ours, pml_accuracy(embeddings, labels))
    assert ours["num_queries_skipped"] == int(np.sum(np.bincount(labels) == 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_query_vs_references_matches_pytorch_metric_learning(seed):
    rng = np.random.default_rng(seed)
    references, reference_labels = clustered(rng, rng.integers(1, 30, size=25), dim=8)
    queries, query_labels = clustered(rng, rng.integers(1, 10, size=30), dim=8, first_label=10)  # labels 25+ absent
    ours = metrics(queries, query_labels, ref_embeddings=references, ref_labels=reference_labels, chunk_size=50)
    assert_matches_pml(ours, pml_accuracy(queries, query_labels, references, reference_labels))
    assert ours["num_queries_skipped"] == int(np.sum(query_labels >= 25))


# Ties, chunking, backends, input types ---------------------------------------------------------------------------


def tied_embeddings(seed: int, num_items: int = 60, dim: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """0/1 embeddings: dot products are small integers, so exact ties are everywhere."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2, size=(num_items, dim)).astype(np.float32), rng.integers(0, 6, size=num_items)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_ties_are_ordered_by_similarity_then_index(chunk_size):
    embeddings, _ = tied_embeddings(seed=0)
    sims = embeddings.astype(np.int64) @ embeddings.T.astype(np.int64)
    np.fill_diagonal(sims, -1)  # below every real similarity (all are >= 0)
    columns = np.arange(len(embeddings))
    expected = np.stack([np.lexsort((columns, -row))[:9] for row in sims])
    tensor = torch.from_numpy(embeddings)
    values, indices = exact_knn(tensor, tensor, 9, self_index=torch.arange(len(tensor)), chunk_size=chunk_size)
    np.testing.assert_array_equal(indices.numpy(), expected)
    np.testing.assert_array_equal(values.numpy(), np.take_along_axis(sims, expected, axis=1))


def test_results_do_not_depend_on_chunk_size_or_input_type():
    embeddings, labels = tied_embeddings(seed=1)
    expected = metrics(embeddings, labels, chunk_size=1)
    for result in (
        metrics(embeddings, labels, chunk_size=13),
        metrics(torch.from_numpy(embeddings).double(), torch.from_numpy(labels).int(), chunk_size=1000),
    ):
        assert result.keys() == expected.keys()
        np.testing.assert_allclose(list(result.values()), list(expected.values()), rtol=1e-12)


def test_faiss_backend_matches_torch_backend():
    pytest.importorskip("faiss")
    embeddings, labels = tied_embeddings(seed=2)
    for chunk_size in (1, 16):
        assert metrics(embeddings, labels, chunk_size=chunk_size, backend="faiss") == metrics(embeddings, labels)
    tensor = torch.from_numpy(embeddings)
    for self_index in (None, torch.arange(len(tensor))):
        faiss_result = exact_knn(tensor, tensor, 7, self_index=self_index, backend="faiss", chunk_size=16)
        torch_result = exact_knn(tensor, tensor, 7, self_index=self_index)
        torch.testing.assert_close(faiss_result, torch_result)
    rng = np.random.default_rng(3)
    references, reference_labels = clustered(rng, rng.integers(1, 20, size=10), dim=8)
    queries, query_labels = clustered(rng, rng.integers(1, 5, size=12), dim=8)
    with_refs = dict(ref_embeddings=references, ref_labels=reference_labels)
    faiss_metrics = metrics(queries, query_labels, backend="faiss", **with_refs)
    torch_metrics = metrics(queries, query_labels, **with_refs)
    assert faiss_metrics.keys() == torch_metrics.keys()
    np.testing.assert_allclose(list(faiss_metrics.values()), list(torch_metrics.values()), rtol=1e-12)


def test_faiss_backend_without_faiss_says_how_to_install():
    code = (
        "import sys; sys.modules['faiss'] = None\n"  # makes `import faiss` fail as if it were not installed
        "import numpy as np\n"
        "from recallk.evaluation import retrieval_metrics\n"
        "retrieval_metrics(np.eye(3, dtype=np.float32), np.array([0, 0, 1]), backend='faiss', progress=False)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    assert "ImportError" in completed.stderr and "pip install faiss-cpu" in completed.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(4)
    embeddings, labels = clustered(rng, rng.integers(1, 20, size=20), dim=16)
    on_gpu = metrics(torch.from_numpy(embeddings).cuda(), torch.from_numpy(labels).cuda())
    on_cpu = metrics(embeddings, labels)
    np.testing.assert_allclose(list(on_gpu.values()), list(on_cpu.values()), rtol=1e-6)


def test_progress_bar_is_shown_when_asked(capsys):
    embeddings, labels = tied_embeddings(seed=3)
    retrieval_metrics(embeddings, labels, progress=True)
    assert "kNN" in capsys.readouterr().err
    retrieval_metrics(embeddings, labels, progress=False)
    assert capsys.readouterr().err == ""
    retrieval_metrics(embeddings, labels)  # a library call is quiet unless asked
    assert capsys.readouterr().err == ""


def test_k_takes_numpy_and_tensor_integers():
    embeddings, labels = tied_embeddings(seed=4)
    expected = retrieval_metrics(embeddings, labels, k=(1, 4))
    for k in (np.array([1, 4]), torch.tensor([4, 1]), [np.int64(1), torch.tensor(4)]):
        assert retrieval_metrics(embeddings, labels, k=k) == expected
    assert retrieval_metrics(embeddings, labels, k=torch.tensor(4))["recall@4"] == expected["recall@4"]
    with pytest.raises(ValueError, match="every k must be a positive integer"):
        retrieval_metrics(embeddings, labels, k=torch.tensor([1.5]))


# Validation ------------------------------------------------------------------------------------------------------


GOOD = unit_vectors([0, 10, 20, 30])
GOOD_LABELS = np.array([0, 0, 1, 1])


def test_rejects_non_finite_rows_and_says_how_many():
    embeddings = GOOD.copy()
    embeddings[1, 0] = np.nan
    embeddings[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"embeddings has NaN or Inf in 2 of \d+ rows \(first at row 1\)"):
        metrics(embeddings, GOOD_LABELS)
    with pytest.raises(ValueError, match=r"ref_embeddings has NaN or Inf in 2 of"):
        metrics(GOOD, GOOD_LABELS, ref_embeddings=embeddings, ref_labels=GOOD_LABELS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(embeddings=GOOD[0]), "must be 2-D"),
        (dict(embeddings=GOOD[:0], labels=GOOD_LABELS[:0]), "empty"),
        (dict(embeddings=np.zeros((4, 2), dtype=np.int64)), "must hold floats"),
        (dict(embeddings=GOOD.tolist()), "torch.Tensor or numpy.ndarray"),
        (dict(labels=GOOD_LABELS[:3]), "labels has 3 entries but embeddings has 4 rows"),
        (dict(labels=GOOD_LABELS.astype(np.float32)), "integer tensor of class ids"),
        (dict(labels=GOOD_LABELS.astype(bool)), "integer tensor of class ids"),
        (dict(labels=GOOD_LABELS[:, None]), "must be a 1-D integer tensor"),
        (dict(k=0), r"positive integer \(>= 1\)"),
        (dict(k=(1, 2.5)), r"positive integer \(>= 1\)"),
        (dict(k=()), "k is empty"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(backend="annoy"), "backend must be one of"),
        (dict(ref_embeddings=GOOD), "both ref_embeddings and ref_labels"),
        (dict(ref_embeddings=GOOD[:, :1], ref_labels=GOOD_LABELS), "dimension 2 but ref_embeddings have 1"),
        (dict(ref_embeddings=GOOD, ref_labels=GOOD_LABELS[:2]), "ref_labels has 2 entries"),
        (dict(labels=np.arange(4)), "no query has a positive.*single item"),
        (dict(ref_embeddings=GOOD, ref_labels=GOOD_LABELS + 5), "no query has a positive.*ref_labels"),
    ],
)
def test_rejects_bad_input_with_a_clear_message(kwargs, message):
    arguments = dict(embeddings=GOOD, labels=GOOD_LABELS) | kwargs
    with pytest.raises(ValueError, match=message):
        metrics(**arguments)
