"""Session fixtures: one real Kafka broker for the whole test session, per-test topic prefixes."""

from __future__ import annotations

import importlib.util
import logging
import uuid
from collections.abc import Iterator
from types import ModuleType

import pytest

from deploy import compiled as compiled_build
from tests.kafka import Broker, session_broker


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """The session's broker (see tests/kafka.py for how it is chosen)."""
    with session_broker() as b:
        yield b


@pytest.fixture(scope="session")
def native(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The native module (processors/native) built from this tree's crate into a temporary
    folder, not in place: the tree under test stays as it is (pure Python, or compiled)."""
    missing = compiled_build.native_missing()
    if missing is not None:
        pytest.skip(missing)
    path = compiled_build.build_native(compiled_build.ROOT, dest=tmp_path_factory.mktemp("native"))
    spec = importlib.util.spec_from_file_location("_native", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own, so tests never see each other's records."""
    return f"t{uuid.uuid4().hex[:10]}."


def pytest_configure(config: pytest.Config) -> None:
    try:  # a compiled build older than its sources would test the old code
        compiled_build.check()
    except compiled_build.CompiledError as exc:
        pytest.exit(str(exc), returncode=2)
    # aiokafka logs every failed reconnect at ERROR: noise in tests that stop the broker on purpose.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
