"""Fixtures of the engine tests: a live MLflow tracking server shared by the tests that need one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.engines._mlflow_server import running_mlflow_server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite store, served artifacts), started once per session.

    Yields:
        Its tracking URI, ``http://127.0.0.1:<port>``.
    """
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as url:
        yield url
