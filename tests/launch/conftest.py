"""Fixtures for the launch tests: one shard set per test session (per xdist worker)."""
from pathlib import Path

import pytest

import train_runs


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_runs.build_data(tmp_path_factory.mktemp("launch-data") / "data")
