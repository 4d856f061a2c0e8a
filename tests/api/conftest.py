from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from concord.api.app import ServerSettings, create_app


@pytest.fixture
def make_client(tiny_model, tmp_path):
    """Factory: a TestClient over the real app (lifespan run) with the shared tiny model."""
    clients = []

    def make(**settings) -> TestClient:
        settings.setdefault("data_dir", tmp_path / "data")
        app = create_app(ServerSettings(**settings), model=tiny_model)
        c = TestClient(app)
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()
