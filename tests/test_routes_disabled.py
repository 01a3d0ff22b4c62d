"""Routes that change weights are off unless the operator enables them, and always honour the API key.
(The plugin's router on a bare FastAPI app: no engine is needed to refuse.)"""

from __future__ import annotations

from argparse import Namespace

from fastapi import FastAPI
from fastapi.testclient import TestClient

from vllm_plasticity.config import PlasticityConfig
from vllm_plasticity.endpoints import ServerState, router

BODY = {"context_ids": [1, 2], "continuation_ids": [3]}


def client(training: bool, api_key: str | None = "k") -> TestClient:
    app = FastAPI()
    app.include_router(router)
    app.state.plasticity = ServerState(None, Namespace(model="m", api_key=api_key), PlasticityConfig(training=training))
    return TestClient(app)


def test_training_routes_are_off_unless_enabled():
    c = client(training=False)
    auth = {"Authorization": "Bearer k"}
    for method, path in (("post", "/train"), ("get", "/train/status"), ("post", "/checkpoint"), ("get", "/checkpoint")):
        r = getattr(c, method)(path, headers=auth, **({"json": BODY} if path == "/train" else {}))
        assert r.status_code == 403, (path, r.status_code)
        assert "--training" in r.json()["detail"]


def test_routes_require_the_api_key_before_anything_else():
    c = client(training=False)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}):
        assert c.post("/train", json=BODY, headers=headers).status_code == 401
        assert c.get("/plasticity/info", headers=headers).status_code == 401


def test_enabled_training_without_shareable_weights_says_why():
    c = client(training=True, api_key=None)
    c.app.state.plasticity.training_unavailable = "training needs weights shared in place"
    r = c.post("/train", json=BODY)
    assert r.status_code == 503 and "shared in place" in r.json()["detail"]


def test_readout_and_steering_routes_are_off_without_a_vectors_dir():
    from vllm_plasticity.endpoints import PlasticityEndpoints
    from vllm_plasticity.readout_service import ReadoutService

    app = FastAPI()
    PlasticityEndpoints().attach_router(app)
    state = ServerState(None, Namespace(model="m", api_key="k"), PlasticityConfig())
    state.readout = ReadoutService(state)
    app.state.plasticity = state
    c = TestClient(app)
    auth = {"Authorization": "Bearer k"}
    calls = (("post", "/readout/load", {"name": "b", "path": "b"}), ("post", "/steering/default", {"steer": []}),
             ("delete", "/readout/b", None), ("delete", "/steering/default", None), ("get", "/readout", None),
             ("get", "/steering/default", None), ("get", "/readout/available", None))
    for method, path, body in calls:  # every readout route agrees: off without a vectors directory
        assert getattr(c, method)(path, **({"json": body} if body else {})).status_code == 401, path
        r = getattr(c, method)(path, headers=auth, **({"json": body} if body else {}))
        assert r.status_code == 403 and "--vectors-dir" in r.json()["detail"], (path, r.status_code)
    r = c.post("/readout/load", headers=auth, json={"name": "b", "path": "b"})
    assert r.status_code == 403 and "--vectors-dir" in r.json()["detail"]


def test_the_page_is_off_without_a_vectors_dir_and_with_no_ui(tmp_path):
    from vllm_plasticity.endpoints import PlasticityEndpoints

    def page_client(config: PlasticityConfig) -> TestClient:
        app = FastAPI()
        PlasticityEndpoints().attach_router(app)
        app.state.plasticity = ServerState(None, Namespace(model="m", api_key="k"), config)
        return TestClient(app)

    for path in ("/plasticity/ui", "/plasticity/ui/app.js"):
        r = page_client(PlasticityConfig()).get(path)
        assert r.status_code == 403 and "--vectors-dir" in r.json()["detail"]
        r = page_client(PlasticityConfig(vectors_dir=tmp_path, ui=False)).get(path)
        assert r.status_code == 403 and "--no-ui" in r.json()["detail"]
    on = page_client(PlasticityConfig(vectors_dir=tmp_path))
    r = on.get("/plasticity/ui")  # static files, no data: served without the key; what the page asks is not
    assert r.status_code == 200 and "<title>plasticity</title>" in r.text
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    assert on.get("/plasticity/ui/app.js").status_code == 200
    r = on.get("/plasticity/ui/../endpoints.py")
    assert r.status_code == 404
