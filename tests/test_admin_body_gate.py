"""Admin routes check their token from the headers, before any of the body is read.

Failed before: FastAPI reads and parses a route's JSON body before its dependencies run, so a
caller with no token could stream any amount to `/v1/weights/*` or `/v1/update_weights_from_disk`
and have it held and parsed (200 MiB read, then 401).
"""

from __future__ import annotations

from typing import Iterator

import pytest
from starlette.testclient import TestClient

from model_engine_server.engines.base import EngineSpec
from model_engine_server.http.app import create_app
from model_engine_server.http.schemas import ADMIN_JSON_BODY_BYTES
from model_engine_server.local import build_local_server

TOKEN = "gate-admin-token"
CHUNKS = 64  # of 1 MiB: far past any admin body


@pytest.fixture(scope="module")
def client(tiny_model):
    app = create_app(build_local_server(EngineSpec(model_path=str(tiny_model))), admin_token=TOKEN, owns_service=True)
    with TestClient(app) as test_client:
        yield test_client


class Stream:
    """A chunked body that counts how much of it the server read."""

    def __init__(self) -> None:
        self.read = 0

    def chunks(self) -> Iterator[bytes]:  # a generator: httpx streams it chunk by chunk
        for _ in range(CHUNKS):
            self.read += 1
            yield b" " * (1 << 20)


@pytest.mark.parametrize("path", ["/v1/weights/begin", "/v1/weights/receive", "/v1/weights/commit",
                                  "/v1/weights/abort", "/v1/update_weights_from_disk", "/v1/pause"])
def test_without_the_token_an_admin_route_answers_401_having_read_none_of_the_body(client, path):
    body = Stream()
    response = client.post(path, content=body.chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    assert body.read == 0


def test_with_the_token_an_oversized_admin_body_is_refused_413(client):
    body = Stream()
    response = client.post("/v1/weights/abort", content=body.chunks(),
                           headers={"content-type": "application/json", "authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 413 and body.read > 1
    small = client.post("/v1/weights/abort", json={"reason": "test"}, headers={"authorization": f"Bearer {TOKEN}"})
    assert small.status_code == 200 and ADMIN_JSON_BODY_BYTES >= 1 << 20
