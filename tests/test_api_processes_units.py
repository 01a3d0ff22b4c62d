"""Several API server processes of one server (plugin/vllm_plasticity/api_processes.py) without vLLM: which
process owns the plugin's state, what they share, and forwarding over the owner's socket with real uvicorn and
httpx (the live server with --api-server-count 2 is tests/test_api_processes.py)."""

from __future__ import annotations

import asyncio
import os

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from vllm_plasticity.api_processes import ApiProcesses, ForwardToOwner


def test_one_process_owns_everything_and_shares_nothing(tmp_path):
    for count in (None, 1):
        processes = ApiProcesses.join(tmp_path, count)
        assert processes.owner and not processes.forwards and processes.address is None
        processes.words.generation += 1
        assert processes.words.generation == 1
        processes.close()
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_first_process_to_join_owns_the_state_and_the_others_read_what_it_writes(tmp_path):
    owner = ApiProcesses.join(tmp_path, 3)
    others = [ApiProcesses.join(tmp_path, 3) for _ in range(2)]  # separate opens: flock tells them apart
    assert owner.owner and not any(p.owner for p in others)
    assert {p.address for p in (owner, *others)} == {f"\0plasticity-api-{os.getppid()}"}
    owner.words.generation += 2
    owner.words.default_steering = True
    assert [(p.words.generation, p.words.default_steering) for p in others] == [(2, True), (2, True)]
    owner.words.default_steering = False
    assert not others[0].words.default_steering
    shared = tmp_path / f"api-{os.getppid()}.shared"
    for p in others:
        p.close()
    assert shared.exists()  # only the owner removes it
    owner.close()
    assert not shared.exists()


def test_a_joining_process_removes_the_shared_files_of_dead_servers_only(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"api-{dead.stdout.strip()}.shared").write_bytes(bytes(16))  # its manager is gone
    (tmp_path / f"api-{os.getpid()}.shared").write_bytes(bytes(16))  # a live one's
    (tmp_path / "api-notes.shared").write_bytes(b"")  # not a name the plugin writes
    processes = ApiProcesses.join(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"api-{os.getpid()}.shared", "api-notes.shared", f"api-{os.getppid()}.shared"])
    processes.close()


def test_a_new_owner_starts_from_zero_whatever_a_dead_server_of_the_same_pid_left(tmp_path):
    (tmp_path / f"api-{os.getppid()}.shared").write_bytes((7).to_bytes(8, "little") + (1).to_bytes(8, "little"))
    owner = ApiProcesses.join(tmp_path, 2)
    assert owner.owner and owner.words.generation == 0 and not owner.words.default_steering
    owner.close()


def owner_app() -> FastAPI:
    app = FastAPI()

    @app.post("/train")
    async def train(request: Request) -> dict:
        return {"served_by": "owner", "body": await request.json(), "query": request.url.query,
                "auth": request.headers.get("authorization")}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks():
            for i in range(3):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(0.01)
        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


def forwarding_app(processes: ApiProcesses) -> FastAPI:
    """A process that forwards: its own /train and /stream (the plugin's routes) never answer."""
    app = FastAPI()

    @app.post("/train")
    async def train() -> dict:
        return {"served_by": "this process"}

    @app.get("/stream")
    async def stream() -> dict:
        return {"served_by": "this process"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"served_by": "this process"}

    app.state.plasticity = type("State", (), {"processes": processes})()
    app.add_middleware(ForwardToOwner, routes=[r for r in app.routes if getattr(r, "path", "") in ("/train", "/stream")])
    return app


def test_the_plugins_routes_are_answered_by_the_owner_and_the_rest_where_they_arrive(tmp_path):
    owner, other = ApiProcesses.join(tmp_path, 2), ApiProcesses.join(tmp_path, 2)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=forwarding_app(other)), base_url="http://api") as c:
            down = await c.post("/train", json={"steps": 1})  # the owner is not listening yet
            assert down.status_code == 503 and "did not answer" in down.json()["error"]["message"]
            await owner.serve_owner_socket(owner_app())
            for _ in range(100):  # uvicorn binds in its task
                if owner._server.started:
                    break
                await asyncio.sleep(0.05)
            r = await c.post("/train?wait=false", json={"steps": 3}, headers={"Authorization": "Bearer k"})
            assert r.headers["x-plasticity-forwarded-by"] == str(os.getpid())
            assert r.status_code == 200 and r.json() == {"served_by": "owner", "body": {"steps": 3}, "query": "wait=false",
                                                         "auth": "Bearer k"}
            async with c.stream("GET", "/stream") as s:
                assert s.headers["content-type"].startswith("text/event-stream")
                assert [line async for line in s.aiter_lines() if line] == ["data: 0", "data: 1", "data: 2"]
            mine = await c.get("/v1/models")
            assert mine.json() == {"served_by": "this process"} and "x-plasticity-forwarded-by" not in mine.headers
        owner._server.should_exit = True
        await owner._task

    try:
        asyncio.run(scenario())
    finally:
        other.close()
        owner.close()


def test_the_owner_passes_its_own_requests_through(tmp_path):
    owner = ApiProcesses.join(tmp_path, 2)
    try:
        app = forwarding_app(owner)

        async def scenario():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
                return (await c.post("/train", json={})).json()

        assert asyncio.run(scenario()) == {"served_by": "this process"}
    finally:
        owner.close()


def test_a_default_steering_set_or_cleared_is_seen_by_every_process(tmp_path):
    """While one is set, the other processes send every completion request to the owner, which applies it."""
    from argparse import Namespace

    from vllm_plasticity.config import PlasticityConfig
    from vllm_plasticity.endpoints import ServerState
    from vllm_plasticity.readout_service import ReadoutService

    owner, other = ApiProcesses.join(tmp_path, 2), ApiProcesses.join(tmp_path, 2)
    try:
        state = ServerState(None, Namespace(model="m"), PlasticityConfig())
        state.processes = owner
        service = ReadoutService(state)
        service.default_steer = {"steer": [["b/joy", 2.0]], "steer_layers": None, "steer_units": None, "terms": []}
        assert other.words.default_steering
        service.default_steer = None  # DELETE /steering/default, or the unload of the bank it named
        assert not other.words.default_steering
    finally:
        other.close()
        owner.close()


def test_an_operator_is_told_when_several_processes_leave_no_time_for_the_exit_checkpoint(tmp_path):
    from vllm_plasticity.api_processes import exit_checkpoint_warning

    owner = ApiProcesses.join(tmp_path, 2)
    try:
        assert "--shutdown-timeout 0" in exit_checkpoint_warning(owner, 0)  # `vllm serve` run directly
        assert exit_checkpoint_warning(owner, None) is not None
        assert exit_checkpoint_warning(owner, 120) is None  # what plasticity serve passes
        assert exit_checkpoint_warning(ApiProcesses.one(), 0) is None  # one process: vLLM's own SIGTERM handling
    finally:
        owner.close()
