"""Keys, scopes, limits, audit, encryption and TLS on real ``llamawrapper serve`` processes
(tiny random-weight models), driven by the official ``openai`` client and httpx, with a real
Redis shared by two server processes."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from security_helpers import RedisServer, self_signed_cert
from server_helpers import ServerProcess

pytestmark = pytest.mark.slow
ADMIN = "admin-bootstrap-secret-for-tests"


def _start(tmp_path: Path, name: str, models: list[str], *flags: str, env: dict | None = None,
           state_url: str | None = None) -> ServerProcess:
    """A server whose keys, audit log and response cache live under ``tmp_path`` (models come
    from the user's cache folder, where smollm2 is converted)."""
    server = ServerProcess(models, "--admin-key", ADMIN, "--state-url", state_url or f"sqlite:///{tmp_path / 'keys.sqlite'}",
                           "--audit-file", str(tmp_path / f"{name}-audit.jsonl"), *flags, log_path=tmp_path / f"{name}.log",
                           env={"LLAMAWRAPPER_CACHE_URL": f"sqlite:///{tmp_path / 'cache' / 'responses.sqlite'}", **(env or {})})
    server.api_key = ADMIN  # the helper polls /ready with it
    return server


def _stop(*servers: ServerProcess) -> None:
    for s in servers:
        s.terminate()


def _admin(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)


def _client(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def _create(server: ServerProcess, **spec) -> dict:
    r = _admin(server).post("/admin/keys", json={"name": "test", **spec})
    assert r.status_code == 201, r.text
    return r.json()


def _chat(client: openai.OpenAI, model: str = "tiny", **kw):
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0, **kw)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir, redis_server):
    """Two server processes sharing one Redis for keys and limits, each serving tiny and tiny2;
    the first writes prompt text (redacted) to its audit log."""
    tmp = tmp_path_factory.mktemp("pair")
    models = [f"tiny={tiny_model_dir}"]
    a = _start(tmp, "a", models, "--log-content", state_url=redis_server.url)
    b = _start(tmp, "b", models, state_url=redis_server.url)
    try:
        for server in (a, b):
            server.wait_ready()
            # the second model through the admin route, once the first is loaded (two models loading
            # at once in one process can fail in transformers' lazy imports)
            r = _admin(server).put("/admin/models/tiny2", json={"source": str(tiny_model_dir)})
            assert r.status_code == 202, r.text
            server.wait_ready()
        yield a, b
    finally:
        _stop(a, b)


def test_scoped_key_sees_404_for_other_model(pair):
    a, _ = pair
    key = _create(a, models=["tiny"])
    client = _client(a, key["key"])
    assert _chat(client).parse().choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError) as info:
        _chat(client, model="tiny2")
    body = info.value.response.json()["error"]
    assert body["code"] == "model_not_found" and "tiny2" in body["message"] and "tiny," not in body["message"]
    # the same answer as for a model that does not exist at all: the key cannot learn tiny2 exists
    with pytest.raises(openai.NotFoundError) as missing:
        _chat(client, model="no-such-model")
    assert missing.value.response.json()["error"]["code"] == "model_not_found"
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tiny2")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny2", prompt="hi", max_tokens=2)
    # the unscoped admin key sees both
    assert {m.id for m in _client(a, ADMIN).models.list()} == {"tiny", "tiny2"}


def test_rpm_limit_429_with_openai_headers(pair):
    a, _ = pair
    key = _create(a, rpm=5, tpm=100000)
    client = _client(a, key["key"])
    remaining = []
    for _ in range(5):
        raw = _chat(client)
        assert raw.headers["x-ratelimit-limit-requests"] == "5"
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
        assert "x-ratelimit-reset-requests" in raw.headers and "x-ratelimit-reset-tokens" in raw.headers
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [4, 3, 2, 1, 0]
    with pytest.raises(openai.RateLimitError) as info:
        _chat(client)
    response = info.value.response
    assert response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    # tokens were counted: prompt at admission, completion at the end
    remaining_tokens = int(response.headers["x-ratelimit-remaining-tokens"])
    assert remaining_tokens < 100000
    shown = _admin(a).get(f"/admin/keys/{key['id']}").json()
    assert shown["usage"]["requests"] == 6 and shown["usage"]["prompt_tokens"] > 0 and shown["last_used_at"]
    # the window's estimate is exact within one minute, and never above what was charged
    assert 0 < 100000 - remaining_tokens <= shown["usage"]["prompt_tokens"] + shown["usage"]["completion_tokens"]


def test_tpm_limit(pair):
    a, _ = pair
    key = _create(a, tpm=10)
    client = _client(a, key["key"])
    _chat(client)  # admitted with 0 used; its prompt alone is over 10 tokens
    with pytest.raises(openai.RateLimitError) as info:
        _chat(client)
    assert "tokens" in info.value.response.json()["error"]["message"]


def test_streamed_tokens_are_charged_once(pair):
    a, _ = pair
    key = _create(a, tpm=100000)
    client = _client(a, key["key"])
    usage = None
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Count"}], max_tokens=40,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
    assert usage.completion_tokens > 16  # more than one group was charged while streaming
    shown = _admin(a).get(f"/admin/keys/{key['id']}").json()["usage"]
    assert (shown["prompt_tokens"], shown["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    line = [e for e in _admin(a).get("/admin/audit", params={"key": key["id"]}).json()["data"] if e["event"] == "request"][-1]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    raw = _chat(client)
    # exact within a minute; past a minute boundary the window's estimate only shrinks
    assert 100000 - usage.total_tokens <= int(raw.headers["x-ratelimit-remaining-tokens"]) < 100000


def test_two_processes_share_limits_and_revocation(pair):
    a, b = pair
    key = _create(a, rpm=5)
    ok = refused = 0
    for i in range(10):
        try:
            _chat(_client(a if i % 2 else b, key["key"]))
            ok += 1
        except openai.RateLimitError:
            refused += 1
    assert (ok, refused) == (5, 5)

    other = _create(b)
    ca, cb = _client(a, other["key"]), _client(b, other["key"])
    assert ca.models.list() and cb.models.list()
    r = _admin(a).delete(f"/admin/keys/{other['id']}")
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    revoked_at = time.monotonic()
    for client in (ca, cb):
        while True:
            try:
                client.models.list()
            except openai.AuthenticationError as exc:
                assert "revoked" in exc.response.json()["error"]["message"]
                break
            assert time.monotonic() - revoked_at < 1.0, "a revoked key still works after a second"
            time.sleep(0.05)
    assert time.monotonic() - revoked_at < 1.5


def test_admin_routes_need_admin_key_and_check_input(pair):
    a, _ = pair
    user = _create(a)
    with httpx.Client(base_url=a.url, headers={"Authorization": f"Bearer {user['key']}"}) as c:
        for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/admin/audit"), ("GET", "/admin/models"),
                             ("PUT", "/admin/models/smollm2"), ("POST", "/admin/models/smollm2/rollback"),
                             ("DELETE", "/admin/models/smollm2")):
            r = c.request(method, path, json={"name": "x"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied", (path, r.text)
    admin = _admin(a)
    for spec, param in (({"name": "x", "rpm": -1}, "rpm"), ({"name": "x", "scopes": ["all"]}, "scopes"),
                        ({"name": "x", "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"), ({"rpm": 3}, "name")):
        r = admin.post("/admin/keys", json=spec)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert admin.get("/admin/keys/key_missing").status_code == 404
    listed = admin.get("/admin/keys").json()["data"]
    assert listed and all("key" not in k and "secret_hash" not in k for k in listed)
    expiring = _create(a, expires_at=time.time() + 1.5)
    assert _client(a, expiring["key"]).models.list()
    time.sleep(1.6)
    with pytest.raises(openai.AuthenticationError) as info:
        _client(a, expiring["key"]).models.list()
    assert "expired" in info.value.response.json()["error"]["message"]


def test_bad_keys_get_401_and_are_audited(pair, tmp_path):
    a, _ = pair
    with httpx.Client(base_url=a.url) as c:
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Token abc"}, {"Authorization": "Bearer lw-wrong"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
    audit = _admin(a).get("/admin/audit", params={"since": time.time() - 60}).json()["data"]
    failures = [e for e in audit if e["event"] == "auth.failed"]
    assert len(failures) >= 4 and all(f["client"] == "127.0.0.1" for f in failures)
    assert "lw-wrong" not in json.dumps(audit)


def test_audit_trail_records_requests_and_verifies(pair):
    a, _ = pair
    key = _create(a, models=["tiny"])
    client = _client(a, key["key"])
    secret_prompt = "mail me at jane.doe@example.com please"
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": secret_prompt}], max_tokens=4,
                                   temperature=0)
    lines = _admin(a).get("/admin/audit", params={"key": key["id"]}).json()["data"]
    chat = [e for e in lines if e["route"] == "/v1/chat/completions"][-1]
    assert chat["key_id"] == key["id"] and chat["model"] == "tiny" and chat["status"] == 200 and chat["version"]
    assert chat["prompt_tokens"] > 0 and chat["completion_tokens"] > 0 and chat["latency_ms"] > 0
    assert chat["client"] == "127.0.0.1" and chat["request_id"]
    # log_content is on for this server: the prompt is there, redacted
    assert "[EMAIL]" in chat["prompt"] and "jane.doe" not in chat["prompt"] and "completion" in chat
    text = Path(a.log_path.parent / "a-audit.jsonl").read_text()
    assert key["key"] not in text and ADMIN not in text
    creations = [e for e in json.loads("[" + ",".join(text.splitlines()) + "]") if e.get("action") == "key.create"]
    assert any(e["target"] == key["id"] for e in creations)
    # the access log (stdout) has no prompt text either
    assert "jane.doe" not in a.log()


def test_model_admin_actions_are_audited(pair):
    a, _ = pair
    lines = _admin(a).get("/admin/audit").json()["data"]
    put = [e for e in lines if e.get("action") == "model.put"]
    assert put and put[0]["name"] == "tiny2" and put[0]["key_id"] == "admin:bootstrap" and put[0]["version"]


def test_keys_cli_against_a_server(pair):
    a, b = pair
    env = {**os.environ, "LLAMAWRAPPER_ADMIN_KEY": ADMIN}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "llamawrapper.cli", "keys", *args], capture_output=True, text=True, env=env)

    made = cli("create", "from-cli", "--model", "tiny", "--rpm", "7", "--server", a.url, "--json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["key"].startswith("lw-") and created["rpm"] == 7
    # the other process shares the Redis store: it lists the key and accepts it
    listed = json.loads(cli("list", "--server", b.url, "--json").stdout)
    assert created["id"] in [k["id"] for k in listed]
    assert [m.id for m in _client(b, created["key"]).models.list()] == ["tiny"]
    assert cli("revoke", created["id"], "--server", b.url).returncode == 0
    refused = cli("list", "--server", a.url, "--admin-key", created["key"])
    assert refused.returncode == 1 and "401" in refused.stderr and "Traceback" not in refused.stderr


def test_audit_verify_reports_an_edited_line(pair):
    _, b = pair
    _client(b, ADMIN).models.list()
    path = b.log_path.parent / "b-audit.jsonl"
    verify = [sys.executable, "-m", "llamawrapper.cli", "audit", "verify", "--file", str(path)]
    ok = subprocess.run(verify, capture_output=True, text=True)
    assert ok.returncode == 0 and "chain intact" in ok.stdout
    copy = path.with_name("edited.jsonl")
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["status"] = 999
    lines[1] = json.dumps(entry, separators=(",", ":"))
    copy.write_text("\n".join(lines) + "\n")
    bad = subprocess.run(verify[:-1] + [str(copy)], capture_output=True, text=True)
    assert bad.returncode == 1 and "line 2" in bad.stderr and "edited" in bad.stderr


def test_redis_down_fails_closed_and_recovers(tmp_path, tiny_model_dir):
    redis = RedisServer(tmp_path, persist=True)
    if redis.binary is None:
        pytest.skip("redis-server is not installed")
    redis.start()
    server = _start(tmp_path, "s", [f"tiny={tiny_model_dir}"], state_url=redis.url)
    try:
        server.wait_ready()
        limited = _create(server, rpm=1000)
        client = _client(server, limited["key"])
        assert _chat(client).status_code == 200
        redis.stop()
        time.sleep(0.6)  # past the key cache
        with pytest.raises(openai.InternalServerError) as info:
            _chat(client)
        assert info.value.response.status_code == 503
        assert info.value.response.json()["error"]["code"] == "state_unavailable"
        assert _client(server, ADMIN).models.list()  # the bootstrap admin key does not need Redis
        redis.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                assert _chat(client).status_code == 200
                break
            except openai.InternalServerError:
                assert time.monotonic() < deadline, "no recovery after Redis came back"
                time.sleep(0.3)
    finally:
        server.terminate()
        redis.stop()


def test_sqlite_store_https_and_encrypted_cache(tmp_path, smollm2_folder):
    """The real smollm2 model, so the answer is known text ("Paris") to look for at rest."""
    from llamawrapper.security.crypto import new_key

    cert, keyfile = self_signed_cert(tmp_path)
    key_file = tmp_path / "enc.key"
    key_file.write_text(new_key())
    env = {"LLAMAWRAPPER_CACHE_ENABLED": "true", "LLAMAWRAPPER_CACHE_URL": f"sqlite:///{tmp_path / 'cache' / 'responses.sqlite'}"}
    server = _start(tmp_path, "tls", ["tiny=smollm2"], "--ssl-certfile", str(cert), "--ssl-keyfile", str(keyfile),
                    "--encryption-key-file", str(key_file), env=env)
    server.url = server.url.replace("http://", "https://")
    try:
        _wait_https(server, cert)
        http = httpx.Client(base_url=server.url, verify=_trust(cert), headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
        made = http.post("/admin/keys", json={"name": "tls-user", "models": ["tiny"]}).json()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=made["key"], max_retries=0,
                               http_client=httpx.Client(verify=_trust(cert), timeout=120))
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        first = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        answer = first.parse().choices[0].message.content
        again = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        assert again.headers.get("x-cache") == "hit" and again.parse().choices[0].message.content == answer
        with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port gets no answer
            httpx.get(server.url.replace("https://", "http://") + "/health", timeout=5).raise_for_status()
        # both clients still hold idle keep-alive TLS connections: SIGTERM must not wait out the
        # 30 s drain timeout for their close_notify (it did)
        t = time.monotonic()
        assert server.terminate() == 0 and time.monotonic() - t < 15, time.monotonic() - t
    finally:
        server.terminate()
    # at rest: no secret in the key store, no answer text in the cache
    store = tmp_path / "keys.sqlite"
    assert store.exists() and made["key"].encode() not in _sqlite_bytes(store)
    cache = tmp_path / "cache" / "responses.sqlite"
    assert "Paris" in answer and b"Paris" not in _sqlite_bytes(cache)
    # a wrong key, or none, is a clear start-up error
    for flags in (("--encryption-key", new_key()), ()):
        proc = subprocess.run([sys.executable, "-m", "llamawrapper.cli", "serve", "tiny=smollm2", "--port", "0", *flags],
                              capture_output=True, text=True, timeout=300, env={**os.environ, **env})
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert ("different key" if flags else "is encrypted") in proc.stderr


def _trust(cert: Path):
    import ssl

    return ssl.create_default_context(cafile=str(cert))


def _sqlite_bytes(path: Path) -> bytes:
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def _wait_https(server: ServerProcess, cert: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(server.log()[-3000:])
        try:
            if httpx.get(server.url + "/ready", verify=_trust(cert), headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(server.log()[-3000:])
