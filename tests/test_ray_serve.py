"""``llamawrapper serve --ray`` on a real local Ray cluster: two replicas of smollm2 with one
thread each, keys, limits and the response cache in a real Redis, driven through the official
``openai`` client. One app for the module (its start is most of the cost); the tests run in
file order, the rollout replaces the app's replicas and the SIGTERM test stops it. The tests
marked ``reliability`` are the Ray half of the reliability suite (docs/RELIABILITY.md)."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import httpx
import openai
import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'llamawrapper[ray]')")

from server_helpers import ServerProcess, answers_after_idle, describe_soak, redis_outage, soak, vanishing_streams, wait_until  # noqa: E402

pytestmark = pytest.mark.slow
reliability = pytest.mark.reliability
ADMIN = "admin-secret-for-the-ray-tests"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory, smollm2_folder, restartable_redis):
    tmp = tmp_path_factory.mktemp("ray-app")
    env = {"LLAMAWRAPPER_CACHE_ENABLED": "true", "LLAMAWRAPPER_CACHE_URL": restartable_redis.url.replace("/0", "/1"),
           "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0",
           "LLAMAWRAPPER_PREFIX_CACHE_MB": "16"}  # full by the end of the soak's warm-up
    # a batch of 12 and a queue of 4: 20 streams are all answered at once with room left on each
    # replica for /metrics (test_vanishing_streams_free_their_slots: Ray counts every request
    # against max_ongoing_requests); 48 requests at once overfill it (test_every_replica_full_gets_429)
    server = ServerProcess(["smollm2"], "--ray", "--replicas", "2", "--threads", "1", "--admin-key", ADMIN,
                           "--max-batch-size", "12", "--max-queue", "4",
                           "--state-url", restartable_redis.url, "--audit-file", str(tmp / "audit.jsonl"),
                           log_path=tmp / "serve.log", env=env)
    server.api_key = ADMIN
    try:
        server.wait_ready(timeout=240)  # one replica is ready...
        admin, deadline = _admin(server), time.monotonic() + 240
        while len({admin.get("/replica").json()["replica"] for _ in range(8)}) < 2:  # ...and the other one too
            assert time.monotonic() < deadline, "the second replica did not start"
            time.sleep(0.5)
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


def test_ray_proxy_keeps_an_idle_connection_past_the_clients_own_keep_alive(ray_app):
    """Ray Serve's proxy closes idle connections after 5 s unless told otherwise, as the openai
    client may reuse one: the server's idle-connection timeout reaches it."""
    first, second = answers_after_idle(ray_app.url + "/health", idle=7)
    assert first[0] == second[0] == 200 and first[1]["status"] == second[1]["status"] == "ok"


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


@reliability
def test_every_replica_full_gets_429_with_retry_after(ray_app):
    """48 chats released together (12x the queue) on 2 replicas x a batch of 12 plus a queue of
    4 (room for 28): the ones that find no room get the single server's 429 (``queue_full``,
    ``Retry-After``), never Ray's 503. The answers are long enough (32 tokens on one thread)
    that the first ones still hold their places when the last ones arrive."""
    client = _client(ray_app)
    start = threading.Barrier(48)

    def one(i: int):
        start.wait(timeout=60)
        try:
            client.chat.completions.create(model="smollm2", max_tokens=32, temperature=0,
                                           messages=[{"role": "user", "content": f"Write a poem about {i}."}],
                                           extra_headers={"cache-control": "no-cache"})
            return 200, None
        except openai.RateLimitError as exc:
            return 429, (exc.response.headers.get("retry-after"), exc.response.json()["error"]["code"])

    with ThreadPoolExecutor(48) as pool:
        results = list(pool.map(one, range(48)))
    refused = [detail for status, detail in results if status == 429]
    assert refused and len(refused) < 48, results
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


# -- the reliability suite on the Ray app (before the rollout: these use the module's settings) --------
@reliability
def test_soak_64_clients_for_60_s(ray_app):
    """The single server's soak (tests/test_reliability.py) on the two replicas, 64 clients for
    60 s (the first 30 s are the warm-up): only 200 and 429 with Retry-After, no request left
    unanswered, the replicas' resident memory within 5 % of its size after warm-up."""
    pids = list(_pids(ray_app).values())
    result = soak(ray_app.url, {"Authorization": f"Bearer {ADMIN}"}, lambda: pids, clients=64, seconds=60, warmup=30)
    print("\nsoak, Ray app:", describe_soak(result))
    assert not result["unexpected"] and not result["hung"], result["unexpected"][:10]
    assert set(result["statuses"]) <= {200, 429} and result["statuses"].get(200, 0) >= 24, result["statuses"]
    wave = result["first_wave"]  # 64 released together against room for 28
    assert len(wave) == 64 and set(wave) == {200, 429}, wave
    assert result["rss_end"] <= 1.05 * result["rss_warm"], describe_soak(result)


def _scrape(admin: httpx.Client, steps: dict) -> tuple[str, tuple[float, float], float]:
    """One ``/metrics`` scrape through Ray's proxy: the replica that answered, (requests in its
    decode batch, requests waiting) and the monotonic time of the answer; ``steps`` gets
    {replica: (time, decode steps so far)}."""
    r = admin.get("/metrics")
    answered = time.monotonic()
    values = {"llamawrapper_running_batch_size": 0.0, "llamawrapper_queue_depth": 0.0}
    for line in r.text.splitlines():
        name = line.split("{", 1)[0]
        if name in values and 'model="smollm2"' in line:
            values[name] += float(line.rsplit(" ", 1)[1])
        if name == "llamawrapper_engine_decode_steps_total" and 'model="smollm2"' in line:
            steps[r.headers["x-replica"]] = (answered, float(line.rsplit(" ", 1)[1]))
    return r.headers["x-replica"], tuple(values.values()), answered


def _engines(admin: httpx.Client, rounds: int = 1, steps: Optional[dict] = None) -> dict[str, tuple[float, float]]:
    """{replica: (requests in its decode batch, requests waiting)} from both replicas' /metrics
    (``rounds`` pairs of concurrent scrapes, then more until both answered); ``steps`` gets
    {replica: (time, decode steps so far)}."""
    steps = {} if steps is None else steps
    seen: dict = {}
    with ThreadPoolExecutor(2) as pool:
        for i in range(rounds + 30):
            # Ray's router may send every scrape of a few rounds to one replica: go on (bounded)
            # until both have answered, so that neither is missing from the figures
            if i >= rounds and len(seen) == 2:
                break
            seen.update((replica, engine) for replica, engine, _ in pool.map(lambda _: _scrape(admin, steps), range(2)))
    return seen


@reliability
def test_vanishing_streams_free_their_slots_within_a_second(ray_app):
    """20 streams on the two replicas (a batch of 12 each); once each has its first words the
    clients close their connections: Ray's proxy cancels the replicas' requests and every
    replica's engine reports its slots free within a second."""
    client, admin = _client(ray_app), _admin(ray_app)

    def while_streaming():
        first, last = {}, {}
        busy = _engines(admin, rounds=4, steps=first)
        time.sleep(2)
        while set(last) != set(first):
            _engines(admin, steps=last)
        return busy, max((last[r][0] - first[r][0]) / max(last[r][1] - first[r][1], 1) for r in first)

    # in waves of 4: a replica's engine queue (4) takes requests faster than its batch does
    replicas, (busy, step), gone = vanishing_streams(client, 20, 4, while_streaming)
    # each replica's time is that of the first scrape answer it gave showing no request (an
    # upper bound: its slots were free by the time it answered), whichever replica Ray picks
    freed: dict[str, float] = {}
    with ThreadPoolExecutor(2) as pool:
        while set(freed) != set(replicas):
            assert time.monotonic() - gone < 10, f"slots still held 10 s after the clients left: {_engines(admin)}"
            for replica, engine, answered in pool.map(lambda _: _scrape(admin, {}), range(2)):
                if engine == (0, 0):
                    freed.setdefault(replica, answered - gone)
    print(f"\n20 vanished streams on {len(set(replicas))} replicas (batches {busy}): slots free after "
          + ", ".join(f"{t:.2f} s" for t in freed.values()) + f" (a decode step took up to {step:.2f} s)")
    # every replica that answered a scrape while the streams ran held all of its streams (by their
    # x-replica headers) in its batch. Ray's router gives a request to the less loaded of the
    # two, so with an uneven split (12/8, seen once) the busier one may answer none of the scrapes
    # until the clients leave; its streams then vouch for it, and it must still report free below
    assert len(replicas) == 20 and busy, (replicas, busy)
    assert all(running == replicas.count(r) for r, (running, _) in busy.items()), (busy, replicas)
    # as on the single server: within a second, or within the step in progress when steps are longer
    assert max(freed.values()) <= max(1.0, 2 * step), (freed, step)


@reliability
def test_redis_stopped_mid_load_skips_the_cache_fails_closed_and_recovers(ray_app, restartable_redis):
    """Redis (keys, limits and the shared response cache) stopped for 5 s while clients ask:
    the limited key gets 503 ``state_unavailable`` (fails closed), the bootstrap admin key is
    answered, without the cache (an answer cached before comes back ``x-cache: miss``, computed
    again); once Redis is back the limited key is answered and the cached answer is a hit again."""
    r = _admin(ray_app).post("/admin/keys", json={"name": "redis-down", "rpm": 100000})
    assert r.status_code == 201, r.text
    limited, admin_client = _client(ray_app, r.json()["key"]), _client(ray_app)
    cached = [{"role": "user", "content": f"Name a fruit ({time.time()})."}]

    def cached_answer() -> tuple[str, str]:
        raw = admin_client.chat.completions.with_raw_response.create(model="smollm2", messages=cached, max_tokens=6,
                                                                      temperature=0)
        return raw.headers.get("x-cache"), raw.parse().choices[0].message.content

    first = cached_answer()
    assert first[0] == "miss" and cached_answer() == ("hit", first[1])

    def asker(client: openai.OpenAI):
        def ask():
            try:
                client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4, temperature=0.8)
                return 200, ""
            except openai.APIStatusError as exc:
                return exc.status_code, f"{exc.response.json()['error']['code']} retry-after={exc.response.headers.get('retry-after')}"
        return ask

    outage = redis_outage(restartable_redis, [("limited", asker(limited))] * 2 + [("admin", asker(admin_client))] * 2,
                          while_down=cached_answer, recovered_by="limited")
    log, down, up, during, recovered = (outage[k] for k in ("log", "down", "up", "during", "recovered"))
    after = cached_answer()
    unexpected = [e for e in log if e[2] != 200 and (e[1], e[2], e[3]) != ("limited", 503, "state_unavailable retry-after=1")]
    assert not unexpected, unexpected[:10]
    while_down = [status for t, who, status, _ in log if who == "limited" and down + 1.0 < t < up - 1.0]
    print(f"\nRedis down on the Ray app: {len(log)} requests; limited key {len(while_down)} while down "
          f"({sum(s != 200 for s in while_down)} refused), answered again {recovered:.2f} s after restart; "
          f"cached answer while down {during[0]}, after {after[0]}")
    assert while_down and all(s != 200 for s in while_down)  # fails closed
    assert any(who == "admin" and down + 1.0 < t < up for t, who, _, _ in log)  # the rest is served
    assert during == ("miss", first[1])  # no 500: the cache was skipped
    assert after == ("hit", first[1])  # and is used again


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


def test_rollout_replaces_replicas_without_a_failed_request(ray_app, restartable_redis, monkeypatch):
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

    # the new replicas keep the shared response cache (build_app forwards this process's
    # LLAMAWRAPPER_* variables to them, as serve --ray forwards its own)
    monkeypatch.setenv("LLAMAWRAPPER_CACHE_ENABLED", "true")
    monkeypatch.setenv("LLAMAWRAPPER_CACHE_URL", restartable_redis.url.replace("/0", "/1"))
    security = SecuritySettings(state_url=restartable_redis.url, admin_key=ADMIN,
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


def _put_tiny(admin: httpx.Client, client: openai.OpenAI, source: str) -> str:
    """A version of the model ``tiny`` put through the admin route (both replicas apply it and
    the call is in the admin log), ready on both replicas; its version name."""
    r = admin.put("/admin/models/tiny", json={"source": source})
    assert r.status_code == 202 and r.headers["x-lw-replicas-applied"] == "2/2", r.text
    assert r.headers["x-lw-admin-log"].isdigit(), r.headers  # recorded for replicas started later
    version = r.json()["version"]

    def answer():
        try:
            raw = client.chat.completions.with_raw_response.create(model="tiny", messages=QUESTION, max_tokens=4)
            return raw.headers["x-replica"], raw.headers["x-model-version"]
        except openai.InternalServerError as exc:  # 503 while the version loads
            assert exc.response.json()["error"]["code"] == "model_unavailable", exc.response.text
            return exc.response.headers["x-replica"], "loading"

    deadline = time.monotonic() + 120
    while set(_until_both(answer).values()) != {version}:
        assert time.monotonic() < deadline, f"{version} of tiny not served by both replicas"
        time.sleep(0.5)
    return version


@reliability
def test_kill_9_of_a_replica_loses_no_request(ray_app, tiny_model_dir):
    """A replica killed with 6 greedy chats in flight (answers being written to the shared
    response cache): none is lost, and asked again afterwards each answer given comes from the
    cache unchanged. Before, two model admin calls put two versions of a second model (``tiny``)
    on the running replicas; the replica Ray starts in place of the killed one replays them
    from the admin log before it takes traffic, so it serves ``tiny`` at the same version as
    the surviving replica."""
    admin, client = _admin(ray_app), _client(ray_app)
    _put_tiny(admin, client, str(tiny_model_dir))
    tiny_version = _put_tiny(admin, client, str(tiny_model_dir))
    before = _pids(ray_app)
    victim_replica, victim_pid = next(iter(before.items()))
    started = threading.Event()

    def story(i: int):
        return client.chat.completions.with_raw_response.create(
            model="smollm2", messages=[{"role": "user", "content": f"Tell me story number {i}."}], max_tokens=120,
            temperature=0)

    def one(i: int):
        started.set()
        try:
            raw = story(i)
            answer = raw.parse().choices[0]
            return 200, raw.headers["x-replica"], answer.finish_reason, answer.message.content
        except openai.APIStatusError as exc:
            return exc.status_code, exc.response.headers.get("retry-after"), None, None

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        started.wait(10)
        time.sleep(1.5)  # requests are on both replicas, none finished (120 tokens at one thread: 40 were
        # done in time on the victim once float32 decoding got 2x faster with onednn_linear)
        os.kill(victim_pid, signal.SIGKILL)
        results = [f.result(timeout=150) for f in futures]  # never a hang
    for status, detail, reason, _ in results:
        assert (status == 200 and detail != victim_replica and reason in ("stop", "length")) or \
               (status == 503 and detail is not None), results
    answers = {i: text for i, (status, _, _, text) in enumerate(results) if status == 200}
    assert answers
    # Ray replaces the replica: a new one (new name, new process) answers again
    deadline, replacement = time.monotonic() + 120, None
    while replacement is None:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        body = admin.get("/replica").json()
        if body["replica"] not in before and body["pid"] not in before.values():
            replacement = body["replica"]
        time.sleep(0.5)
    # ...and it serves what the admin calls made of the others, not only the command line's models
    def tiny():  # no 503 "loading" either: the replacement takes traffic once it has replayed the log
        try:
            raw = client.chat.completions.with_raw_response.create(model="tiny", messages=QUESTION, max_tokens=4)
            return raw.headers["x-replica"], (200, raw.headers["x-model-version"])
        except openai.APIStatusError as exc:
            return exc.response.headers.get("x-replica"), (exc.status_code, exc.response.text[:200])

    served = _until_both(tiny)
    assert served[replacement] == (200, tiny_version), served
    assert set(served.values()) == {(200, tiny_version)}, served
    # the cache after the kill: every answer given is served from it, unchanged
    with ThreadPoolExecutor(6) as pool:
        again = list(pool.map(story, range(6)))
    hits = {i: raw.parse().choices[0].message.content for i, raw in enumerate(again) if raw.headers.get("x-cache") == "hit"}
    assert set(answers) <= set(hits) and all(hits[i] == text for i, text in answers.items()), (answers, hits)


@reliability
def test_sigterm_drains_streams_and_exits_0(ray_app):
    """SIGTERM to ``serve --ray`` with 16 streams in flight: every stream runs to its finish
    reason, the process exits 0 and the local cluster is gone."""
    client = _client(ray_app)
    streaming, sent = [], threading.Event()

    def stream(i: int):
        chunks = client.chat.completions.create(model="smollm2", stream=True, max_tokens=24, temperature=0,
                                                messages=[{"role": "user", "content": f"Count to ten, take {i}."}])
        reasons = []
        with chunks:  # closed on the way out, also when the test fails
            for n, chunk in enumerate(chunks):
                if n == 1:
                    streaming.append(i)
                    sent.wait(300)  # the rest of the answer waits in the socket until SIGTERM is sent
                reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
        return reasons

    with ThreadPoolExecutor(16) as pool:
        futures = []
        try:
            for first in range(0, 16, 4):  # in waves (the replicas' engine queues hold 4 each)
                futures += [pool.submit(stream, i) for i in range(first, first + 4)]
                wait_until(lambda: len(streaming) == len(futures), futures, timeout=300)
            ray_app.proc.send_signal(signal.SIGTERM)
        finally:
            sent.set()
        reasons = [f.result(timeout=120) for f in futures]
    assert all(len(r) == 1 and r[0] in ("stop", "length") for r in reasons), reasons  # every stream ran to its end
    assert ray_app.proc.wait(120) == 0, ray_app.log()[-3000:]
    with pytest.raises(httpx.TransportError):  # the proxy is gone with the local cluster
        httpx.get(ray_app.url + "/health", timeout=5)
