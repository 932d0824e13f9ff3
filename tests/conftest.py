"""Shared fixtures: real server processes on 127.0.0.1.

``core_server`` serves ``tests/model_repository`` (Python-backend test models);
``chat_server`` serves triserve's default repository (the real SmolLM2 chat model).
Both live for the whole test session and are stopped by PID at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serverproc import ServerProcess  # noqa: E402

TESTS = Path(__file__).parent
TEST_REPOSITORY = TESTS / "model_repository"
DEFAULT_REPOSITORY = TESTS.parent / "triserve" / "model_repository"
DEFAULT_CHAT_MODEL = "smollm2"


@pytest.fixture(scope="session")
def core_server():
    with ServerProcess(TEST_REPOSITORY) as server:
        yield server


@pytest.fixture(scope="session")
def chat_server():
    with ServerProcess(DEFAULT_REPOSITORY, ready_timeout=600) as server:
        yield server
