"""Shared fixtures.

chDB allows one data directory per process at a time, so every fixture that opens an
embedded store closes it at teardown; tests that need a second process holding a store run it
as a subprocess.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.processes import CollectorProcess

# No test may reach the network for models or data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"chdb://{tmp_path / 'store'}"


@pytest.fixture
def store(store_url: str) -> Iterator[object]:
    from lightspan.store import Store

    s = Store.connect(store_url)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama built offline from a config and a trained tokenizer, saved as a Hugging Face folder.

    One per test session: tests load it with `from_pretrained` as users load real checkpoints, and
    none writes into it.
    """
    from lightspan.loop.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def collector_process(tmp_path: Path) -> Iterator[CollectorProcess]:
    """The real `lightspan collector` process on an embedded store in tmp_path, on free ports
    (see helpers.processes); stopped with SIGTERM at teardown."""
    with CollectorProcess(f"chdb://{tmp_path / 'data'}", log=tmp_path / "collector.log") as collector:
        yield collector
