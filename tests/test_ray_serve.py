"""``llamawrapper serve --ray`` on a real local Ray cluster: two replicas of smollm2 with one
thread each, keys, limits and the response cache in a real Redis, driven through the official
``openai`` client. One app for the module (its start is most of the cost)."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'llamawrapper[ray]')")

from server_helpers import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow
ADMIN = "admin-secret-for-the-ray-tests"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory, smollm2_folder, redis_server):
    tmp = tmp_path_factory.mktemp("ray-app")
    env = {"LLAMAWRAPPER_CACHE_ENABLED": "true", "LLAMAWRAPPER_CACHE_URL": redis_server.url.replace("/0", "/1"),
           "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    # a batch of 4 and a queue of 4: 12 requests fill the app (test_every_replica_full_gets_429)
    server = ServerProcess(["smollm2"], "--ray", "--replicas", "2", "--threads", "1", "--admin-key", ADMIN,
                           "--max-batch-size", "4", "--max-queue", "4",
                           "--state-url", redis_server.url, "--audit-file", str(tmp / "audit.jsonl"),
                           log_path=tmp / "serve.log", env=env)
    server.api_key = ADMIN
    try:
        server.wait_ready(timeout=240)
        yield server
    finally:
        server.terminate(timeout=120)


def _client(server: ServerProcess, key: str = ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def _admin(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)


def _chat(client: openai.OpenAI, **kw):
    return client.chat.completions.with_raw_response.create(model="smollm2", messages=QUESTION, max_tokens=8,
                                                            temperature=0, **kw)


def _until_both(call, limit: int = 12) -> dict:
    """Call in concurrent pairs until two different replicas answered (bounded; Ray's router
    sends the second of two requests in flight to the idle replica); {replica: a result}."""
    seen: dict = {}
    with ThreadPoolExecutor(2) as pool:
        for _ in range(limit):
            for replica, value in pool.map(lambda _: call(), range(2)):
                seen.setdefault(replica, value)
            if len(seen) == 2:
                return seen
    raise AssertionError(f"only replicas {list(seen)} answered {2 * limit} requests")


def test_answers_streams_probes_and_metrics_from_both_replicas(ray_app):
    client = _client(ray_app)

    def answer():
        raw = _chat(client, extra_headers={"cache-control": "no-cache"})
        return raw.headers["x-replica"], raw.parse().choices[0].message.content

    def stream():
        raw = _chat(client, stream=True)
        chunks = list(raw.parse())
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        return raw.headers["x-replica"], "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    answers, streams = _until_both(answer), _until_both(stream)
    assert set(answers) == set(streams)
    texts = set(answers.values()) | set(streams.values())
    assert len(texts) == 1 and texts.pop().strip()  # greedy: the same answer from every replica, whole or streamed

    admin = _admin(ray_app)
    for path in ("/health", "/ready"):
        r = admin.get(path)
        assert r.status_code == 200 and r.headers["x-replica"] in answers and r.json()["models"] == {"smollm2": "ready"}

    def metrics():
        r = admin.get("/metrics")
        labels = {line.split('replica="')[1].split('"')[0] for line in r.text.splitlines() if 'replica="' in line}
        assert labels == {r.headers["x-replica"]}  # one replica's registry, labelled with its name
        tokens = sum(float(line.rsplit(" ", 1)[1]) for line in r.text.splitlines()
                     if line.startswith("llamawrapper_generation_tokens_total{"))
        return r.headers["x-replica"], tokens

    assert all(tokens > 0 for tokens in _until_both(metrics).values())


def test_rate_limit_holds_across_replicas(ray_app):
    r = _admin(ray_app).post("/admin/keys", json={"name": "shared-limit", "rpm": 5})
    assert r.status_code == 201, r.text
    client = _client(ray_app, r.json()["key"])

    def one(_):
        try:
            raw = _chat(client, extra_headers={"cache-control": "no-cache"})
            return raw.headers["x-replica"], 200
        except openai.RateLimitError as exc:
            assert int(exc.response.headers["retry-after"]) >= 1
            return exc.response.headers["x-replica"], 429

    outcomes: list[tuple[str, int]] = []
    with ThreadPoolExecutor(2) as pool:  # pairs in flight: both replicas take part
        while len(outcomes) < 8 or len({replica for replica, _ in outcomes}) < 2:
            assert len(outcomes) < 24, f"one replica answered everything: {outcomes}"
            outcomes += pool.map(one, range(2))
    statuses = [status for _, status in outcomes]
    assert statuses.count(200) == 5 and statuses.count(429) == len(statuses) - 5, outcomes


def test_response_cache_is_shared(ray_app):
    client = _client(ray_app)
    prompt = [{"role": "user", "content": f"Name a colour ({time.time()})"}]

    def call():
        raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=prompt, max_tokens=6, temperature=0)
        return raw.headers["x-replica"], (raw.headers.get("x-cache"), raw.parse().choices[0].message.content)

    first = call()
    assert first[1][0] == "miss"
    seen = _until_both(call)
    other = next(replica for replica in seen if replica != first[0])
    assert seen[other] == ("hit", first[1][1])  # the other replica answered from the shared cache


def test_every_replica_full_gets_429_with_retry_after(ray_app):
    """32 chats released together on 2 replicas x a batch of 4 plus a queue of 4 (room for 12):
    the ones that find no room get the single server's 429 (``queue_full``, ``Retry-After``),
    never Ray's 503. The answers are long enough (32 tokens on one thread) that the first
    twelve still hold their places when the last ones arrive."""
    client = _client(ray_app)
    start = threading.Barrier(32)

    def one(i: int):
        start.wait(timeout=60)
        try:
            client.chat.completions.create(model="smollm2", max_tokens=32, temperature=0,
                                           messages=[{"role": "user", "content": f"Write a poem about {i}."}],
                                           extra_headers={"cache-control": "no-cache"})
            return 200, None
        except openai.RateLimitError as exc:
            return 429, (exc.response.headers.get("retry-after"), exc.response.json()["error"]["code"])

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    refused = [detail for status, detail in results if status == 429]
    assert refused and len(refused) < 32, results
    assert all(int(after) >= 1 and code == "queue_full" for after, code in refused), refused


def test_model_admin_calls_reach_every_replica(ray_app, tiny_model_dir):
    """A new version put through the admin route (Ray gives the call to one replica) is loaded
    by both; the answer lists each replica's result; then chats from both carry the version."""
    admin, client = _admin(ray_app), _client(ray_app)
    r = admin.put("/admin/models/smollm2", json={"source": str(tiny_model_dir)})
    assert r.status_code == 202, r.text
    new = r.json()["version"]
    replicas = r.json()["replicas"]
    assert r.headers["x-lw-replicas-applied"] == "2/2" and len(replicas) == 2, r.text
    assert all(v["status"] == 202 and v["body"]["version"] == new for v in replicas.values()), replicas

    def version():
        raw = _chat(client, extra_headers={"cache-control": "no-cache"})
        return raw.headers["x-replica"], raw.headers["x-model-version"]

    seen: dict = {}
    deadline = time.monotonic() + 90
    with ThreadPoolExecutor(2) as pool:  # the old version answers until the new one is loaded
        while set(seen) != set(replicas) and time.monotonic() < deadline:
            seen.update((replica, v) for replica, v in pool.map(lambda _: version(), range(2)) if v == new)
    assert set(seen) == set(replicas), f"{new} answered only from {list(seen)} of {list(replicas)}"

    r = admin.post("/admin/models/smollm2/rollback")  # another admin call, the same way
    assert r.status_code == 202 and r.headers["x-lw-replicas-applied"] == "2/2", r.text
    assert len({v["body"]["version"] for v in r.json()["replicas"].values()}) == 1


def _pids(server: ServerProcess) -> dict[str, int]:
    """{replica: pid} of both replicas: ``/replica`` asked while a chat keeps one replica busy
    (Ray's router then prefers the other)."""
    admin, client, seen = _admin(server), _client(server), {}
    with ThreadPoolExecutor(1) as pool:
        for _ in range(12):
            busy = pool.submit(client.chat.completions.create, model="smollm2", messages=QUESTION, max_tokens=24,
                               temperature=0, extra_headers={"cache-control": "no-cache"})
            time.sleep(0.3)
            body = admin.get("/replica").json()
            seen[body["replica"]] = body["pid"]
            busy.result()
            if len(seen) == 2:
                return seen
    raise AssertionError(f"only replicas {list(seen)} answered /replica")


def test_rollout_replaces_replicas_without_a_failed_request(ray_app, redis_server):
    """A redeploy with changed settings (here ``max_choices``) through ``build_app``, from a
    second driver on the same cluster, while two clients keep asking: Ray replaces the
    replicas one by one (a new one only takes traffic once its model is loaded)."""
    import ray
    from ray import serve

    from llamawrapper.config import EngineSettings, RaySettings, SecuritySettings, ServerSettings
    from llamawrapper.deploy import build_app

    before = _pids(ray_app)
    client, stop, statuses = _client(ray_app), threading.Event(), []

    def keep_asking() -> None:
        while not stop.is_set():
            try:
                raw = _chat(client, extra_headers={"cache-control": "no-cache"})
                statuses.append((200, raw.headers["x-replica"]))
            except openai.APIStatusError as exc:
                statuses.append((exc.status_code, exc.response.text[:200]))
            except openai.APIConnectionError as exc:
                statuses.append((0, str(exc)))

    security = SecuritySettings(state_url=redis_server.url, admin_key=ADMIN,
                                audit_file=str(ray_app.log_path.parent / "audit2.jsonl"))
    app = build_app(["smollm2"], settings=ServerSettings(max_choices=7), engine=EngineSettings(threads=1),
                    security=security, ray=RaySettings(replicas=2))
    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    try:
        with ThreadPoolExecutor(2) as pool:
            for _ in range(2):
                pool.submit(keep_asking)
            try:
                serve.run(app, name="llamawrapper", route_prefix="/", blocking=False)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:  # until only new replicas answer
                    recent = {r for status, r in statuses[-6:] if status == 200}
                    if len(statuses) > 6 and recent and not recent & set(before):
                        break
                    time.sleep(0.5)
            finally:
                stop.set()
    finally:
        ray.shutdown()
    assert statuses and all(status == 200 for status, _ in statuses), [s for s in statuses if s[0] != 200][:5]
    answered_by = {r for _, r in statuses}
    assert answered_by & set(before) and answered_by - set(before)  # old replicas, then new ones answered
    assert not {r for _, r in statuses[-4:]} & set(before)


def test_kill_9_of_a_replica_loses_no_request(ray_app):
    before = _pids(ray_app)
    victim_replica, victim_pid = next(iter(before.items()))
    client = _client(ray_app)
    started = threading.Event()

    def one(i: int):
        started.set()
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="smollm2", messages=[{"role": "user", "content": f"Tell me story number {i}."}], max_tokens=40,
                temperature=0)
            return 200, raw.headers["x-replica"], raw.parse().choices[0].finish_reason
        except openai.APIStatusError as exc:
            return exc.status_code, exc.response.headers.get("retry-after"), None

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        started.wait(10)
        time.sleep(1.5)  # requests are on both replicas, none finished (40 tokens at one thread)
        os.kill(victim_pid, signal.SIGKILL)
        results = [f.result(timeout=150) for f in futures]  # never a hang
    for status, detail, reason in results:
        assert (status == 200 and detail != victim_replica and reason in ("stop", "length")) or \
               (status == 503 and detail is not None), results
    assert sum(status == 200 for status, _, _ in results) >= 1
    # Ray replaces the replica: a new one (new name, new process) answers again
    admin, deadline = _admin(ray_app), time.monotonic() + 120
    while time.monotonic() < deadline:
        body = admin.get("/replica").json()
        if body["replica"] not in before and body["pid"] not in before.values():
            return
        time.sleep(0.5)
    raise AssertionError("the killed replica was not replaced")


def test_sigterm_drains_streams_and_exits_0(ray_app):
    client = _client(ray_app)
    first_chunk = threading.Barrier(3 + 1, timeout=60)

    def stream(i: int):
        chunks = client.chat.completions.create(model="smollm2", stream=True, max_tokens=24, temperature=0,
                                                messages=[{"role": "user", "content": f"Count to ten, take {i}."}])
        reasons = []
        for n, chunk in enumerate(chunks):
            if n == 1:
                first_chunk.wait()
            reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
        return reasons

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(stream, i) for i in range(3)]
        first_chunk.wait()
        ray_app.proc.send_signal(signal.SIGTERM)
        reasons = [f.result(timeout=120) for f in futures]
    assert all(len(r) == 1 and r[0] in ("stop", "length") for r in reasons), reasons  # every stream ran to its end
    assert ray_app.proc.wait(120) == 0, ray_app.log()[-3000:]
    with pytest.raises(httpx.TransportError):  # the proxy is gone with the local cluster
        httpx.get(ray_app.url + "/health", timeout=5)
