"""Shared fixtures.

chDB allows one data directory per process at a time, so every fixture that opens an
embedded store closes it at teardown; tests that need a second process holding a store run it
as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

# No test may reach the network for models or data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"chdb://{tmp_path / 'store'}"


@pytest.fixture
def store(store_url: str) -> Iterator["object"]:
    from lightspan.store import Store

    s = Store.connect(store_url)
    try:
        yield s
    finally:
        s.close()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m lightspan ARGS` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "lightspan", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
