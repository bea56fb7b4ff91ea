"""The model host through a real server process: admin routes, a hot swap under continuous load,
a broken version, a canary share, rollback, keep-alive, runtime adapters and bad input — what
an operator sees over HTTP (statuses, bodies, ``x-model-version``)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server_helpers import ServerProcess

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """One server for the module (a start costs ~9 s here); each test works on a name of its own."""
    srv = ServerProcess([f"chat={tiny_model_dir}"], log_path=tmp_path_factory.mktemp("host-server") / "server.log")
    srv.wait_ready()
    yield srv
    srv.terminate()


_names = itertools.count(1)


@pytest.fixture
def name(server, tiny_model_dir):
    """A new model name on the shared server, created by a first PUT (its v1), ready; removed after."""
    new = f"chat{next(_names)}"
    with server.client() as c:
        r = c.put(f"/admin/models/{new}", json={"source": str(tiny_model_dir)})
        assert r.status_code == 202 and r.json() == {"name": new, "version": "v1", "status": "loading"}
        _wait_status(c, new, "v1", "ready")
    yield new
    with server.client() as c:
        assert c.delete(f"/admin/models/{new}").status_code in (200, 404)


def _wait_status(client: httpx.Client, name: str, version: str, want: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.get(f"/admin/models/{name}").json()
        v = next(v for v in info["versions"] if v["version"] == version)
        if v["status"] == want:
            return v
        assert v["status"] != "failed" or want == "failed", v
        time.sleep(0.1)
    raise AssertionError(f"{name} {version} never became {want}: {info}")


def _chat(client: httpx.Client, model: str = "chat") -> httpx.Response:
    return client.post("/v1/chat/completions", json={**CHAT, "model": model})


def test_swap_under_load_loses_no_request(server, name, tiny_model_dir):
    """8 clients send requests for at least 20 s; a PUT swaps the version after 5 s. Each client
    goes on until it has finished one request begun 0.5 s after the new version was ready (the
    loader process loads it at low priority, and on a loaded machine one answer can take seconds),
    within a bound of 120 s."""
    results: list[tuple[float, int, str]] = []
    start = time.monotonic()
    ready_at = [float("inf")]
    lock = threading.Lock()

    def client_loop() -> None:
        with server.client() as c:
            while time.monotonic() < start + 120:
                started = time.monotonic()
                r = _chat(c, name)
                with lock:
                    results.append((started, r.status_code, r.headers.get("x-model-version", "")))
                if time.monotonic() > start + 20 and started > ready_at[0] + 0.5:
                    return

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(5)
    with server.client() as admin:
        put = admin.put(f"/admin/models/{name}", json={"source": str(tiny_model_dir), "dtype": "bfloat16"})
        assert put.status_code == 202 and put.json() == {"name": name, "version": "v2", "status": "loading"}
        _wait_status(admin, name, "v2", "ready")
        ready_at[0] = time.monotonic()
    for t in threads:
        t.join()
    assert len(results) > 50
    assert {status for _, status, _ in results} == {200}, [r for r in results if r[1] != 200][:5]
    after = [v for started, _, v in results if started > ready_at[0] + 0.5]
    assert len(after) >= 8 and set(after) == {"v2"}
    assert {v for started, _, v in results if started < ready_at[0] - 5} == {"v1"}


def test_admin_view_and_broken_version(server, name, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with server.client() as c:
        listing = c.get("/admin/models").json()["data"]
        assert {"chat", name} <= {m["name"] for m in listing}
        for n in ("chat", name):  # the model of the command line and one a PUT created
            v1 = next(m for m in listing if m["name"] == n)["versions"][0]
            assert v1["version"] == "v1" and v1["status"] == "ready" and v1["traffic"] == 1.0
            assert v1["memory_bytes"] > 0 and v1["loaded_at"] and v1["source"] and "sha256" in v1
        assert c.put(f"/admin/models/{name}", json={"source": str(broken)}).status_code == 202
        failed = _wait_status(c, name, "v2", "failed")
        assert "config" in failed["error"].lower()
        r = _chat(c, name)
        assert r.status_code == 200 and r.headers["x-model-version"] == "v1"
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == [m["name"] for m in listing]


def test_canary_share_then_promote_and_rollback(server, name, tiny_model_dir):
    with server.client() as c:
        r = c.put(f"/admin/models/{name}", json={"source": str(tiny_model_dir), "traffic": 0.25})
        assert r.status_code == 202
        _wait_status(c, name, "v2", "ready")
        versions = [_chat(c, name).headers["x-model-version"] for _ in range(200)]
        assert 0.10 <= versions.count("v2") / 200 <= 0.40, versions.count("v2")
        served = {v: server.metric("llamawrapper_e2e_request_latency_seconds_count", model=name, version=v) for v in ("v1", "v2")}
        assert served == {"v1": versions.count("v1"), "v2": versions.count("v2")}  # metrics per model and version
        assert c.post(f"/admin/models/{name}/promote").json()["version"] == "v2"
        assert {_chat(c, name).headers["x-model-version"] for _ in range(10)} == {"v2"}
        assert c.post(f"/admin/models/{name}/rollback").status_code == 202
        _wait_status(c, name, "v1", "ready")
        assert {_chat(c, name).headers["x-model-version"] for _ in range(10)} == {"v1"}


def test_pins_and_bad_input(server, name, tiny_model_dir):
    with server.client() as c:
        assert _chat(c, f"{name}@v1").headers["x-model-version"] == "v1"
        r = _chat(c, f"{name}@v9")
        assert r.status_code == 404 and "v1 (ready)" in r.json()["error"]["message"]
        r = c.put(f"/admin/models/{name}", json={"source": "no-such-model"})
        assert r.status_code == 404 and "no-such-model" in r.json()["error"]["message"] and r.json()["error"]["param"] == "source"
        r = c.put(f"/admin/models/{name}", json={"source": str(tiny_model_dir), "sha256": "a" * 64})
        assert r.status_code == 409 and r.json()["error"]["code"] == "sha256_mismatch" and "a" * 64 in r.json()["error"]["message"]
        r = c.put(f"/admin/models/{name}", json={"source": str(tiny_model_dir), "traffic": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "traffic"
        assert c.put(f"/admin/models/{name}", json={"source": str(tiny_model_dir)}).status_code == 202
        r = c.put(f"/admin/models/{name}", json={"source": str(tiny_model_dir)})  # v2 is still loading
        assert r.status_code == 409 and "still loading" in r.json()["error"]["message"]
        _wait_status(c, name, "v2", "ready")
        assert c.post(f"/admin/models/{name}/promote").status_code == 409  # no canary
        assert c.delete(f"/admin/models/{name}").json() == {"name": name, "status": "removed"}
        r = _chat(c, name)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert c.get(f"/admin/models/{name}").status_code == 404


def test_runtime_adapter(server, name, adapter_dirs):
    with server.client() as c:
        r = c.put(f"/admin/models/{name}/adapters/sql", json={"path": str(adapter_dirs["sql"])})
        assert r.status_code == 202
        _wait_status(c, name, r.json()["version"], "ready")
        base, lora = _chat(c, name), _chat(c, f"{name}:sql")
        assert lora.status_code == 200 and lora.headers["x-model-version"] == r.json()["version"]
        assert lora.json()["choices"][0]["message"]["content"] != base.json()["choices"][0]["message"]["content"]
        r = c.put(f"/admin/models/{name}/adapters/x", json={"path": "/nowhere"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "path"
        r = c.delete(f"/admin/models/{name}/adapters/sql")
        assert r.status_code == 202
        _wait_status(c, name, r.json()["version"], "ready")
        assert _chat(c, f"{name}:sql").status_code == 404


def test_keep_alive_unloads_and_reloads(tiny_model_dir, tmp_path):
    srv = ServerProcess([f"chat={tiny_model_dir}"], "--keep-alive", "1", log_path=tmp_path / "server.log")
    try:
        srv.wait_ready()
        with srv.client() as c:
            assert _chat(c).status_code == 200
            _wait_status(c, "chat", "v1", "unloaded", timeout=30)
            r = _chat(c)  # loads it again and answers
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
            assert c.get("/admin/models/chat").json()["versions"][0]["status"] == "ready"
    finally:
        srv.terminate()


def test_models_file(tiny_model_dir, tmp_path):
    from llamawrapper.models.versions import folder_sha256

    path = tmp_path / "models.toml"
    path.write_text(f'[assistant]\nsource = "{tiny_model_dir}"\nsha256 = "{folder_sha256(tiny_model_dir)}"\n')
    srv = ServerProcess([], "--models-file", str(path), log_path=tmp_path / "server.log")
    try:
        srv.wait_ready()
        with srv.client() as c:
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["assistant"]
            assert _chat(c, "assistant").status_code == 200
    finally:
        srv.terminate()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamawrapper.cli", *args], capture_output=True, text=True, timeout=300)


def test_admin_cli_drives_the_server(server, name, tiny_model_dir, tmp_path):
    import json as _json

    done = _cli("admin", "models", "put", name, str(tiny_model_dir), "--dtype", "bfloat16", "--wait", "--json",
                "--url", server.url)
    assert done.returncode == 0, done.stderr
    assert _json.loads(done.stdout) == {"name": name, "version": "v2", "status": "ready", "error": None}
    listing = _json.loads(_cli("admin", "models", "list", "--json", "--url", server.url).stdout)
    assert [(v["version"], v["dtype"]) for v in next(m for m in listing["data"] if m["name"] == name)["versions"]] == [("v1", "float32"), ("v2", "bfloat16")]
    bad = _cli("admin", "models", "put", name, "no-such-model", "--url", server.url)
    assert bad.returncode == 1 and "404" in bad.stderr and "no-such-model" in bad.stderr and "Traceback" not in bad.stderr
    gone = _cli("admin", "models", "list", "--url", "http://127.0.0.1:9")
    assert gone.returncode == 1 and "cannot reach" in gone.stderr


def test_models_lock_cli(tiny_model_dir, tmp_path):
    from llamawrapper.models.versions import folder_sha256

    path = tmp_path / "models.toml"
    path.write_text(f'[chat]\nsource = "{tiny_model_dir}"\n')
    done = _cli("models", "lock", str(path))
    assert done.returncode == 0, done.stderr
    assert f'sha256 = "{folder_sha256(tiny_model_dir)}"' in path.read_text()
    path.write_text('[chat]\nsource = "no-such-model"\n')
    bad = _cli("models", "lock", str(path))
    assert bad.returncode == 1 and "no-such-model" in bad.stderr and "Traceback" not in bad.stderr
