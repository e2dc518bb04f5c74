"""The top-level package: lazy public names that dir() lists, without importing torch."""

from __future__ import annotations

import subprocess
import sys


def test_dir_lists_the_public_names_without_importing_torch() -> None:
    code = (
        "import sys, recallk\n"
        "names = [n for n in dir(recallk) if not n.startswith('_')]\n"
        "print(names, 'torch' in sys.modules)\n"
        "assert all(callable(getattr(recallk, n)) for n in names if n != '__version__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == (
        "['CrossBatchRecallAtK', 'FastAPLoss', 'Index', 'LabelledDataset', 'RecallAtKLoss', 'RecallkModel', "
        "'SimilarityMixup', 'SmoothAPLoss', 'fit', 'load_model', 'retrieval_metrics'] False"
    )


def test_every_listed_name_resolves() -> None:
    import recallk

    assert "__version__" in dir(recallk) and "__getattr__" in dir(recallk)
    for name in recallk.__all__:
        assert getattr(recallk, name) is not None
