from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LOSA_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and the test machine is shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not available")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    import random

    rng = random.Random(0)
    words = "the a model sparse weight prune layer token block rank mask data text of and to in".split()
    p.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)))
    return p


@pytest.fixture(scope="module")
def s70(tmp_path_factory) -> Path:
    """A tiny Llama pruned to 70% unstructured, with its explicit masks (sparse_tiny.py); one per test module."""
    from sparse_tiny import save_sparse_tiny

    return save_sparse_tiny(tmp_path_factory.mktemp("s70") / "model", "70")


@pytest.fixture(scope="module")
def s24(tmp_path_factory) -> Path:
    """A tiny Llama pruned to 2:4, saved without a masks file; one per test module."""
    from sparse_tiny import save_sparse_tiny

    return save_sparse_tiny(tmp_path_factory.mktemp("s24") / "model", "2:4", with_masks=False)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Keep the real GGUF cache (expensive to rebuild) but isolate self-data caches per test.
    monkeypatch.setenv("LOSA_DEPLOY_CACHE", os.environ.get("LOSA_DEPLOY_CACHE", str(Path.home() / ".cache" / "losa-deploy")))


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda():
            item.add_marker(skip_gpu)
