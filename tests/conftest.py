"""Shared fixtures. GPU tests (`@pytest.mark.gpu`) are skipped where CUDA is absent."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """An HF tokenizer directory with Fuyu's special tokens, built offline."""
    from otterhd_ray.data.tokenizer import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(out)
    return out
