"""The security package without a server: key validation, both key stores (SQLite and a real
Redis), the limiters (in-process and Redis, shared by two limiter objects as by two processes),
the audit chain (edited, deleted and pruned lines), AES-GCM, the encrypted response cache and
the keys/audit commands."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import pytest

from llamawrapper.errors import (AuthenticationError, EncryptionKeyError, InvalidRequestError, KeyNotFoundError,
                                 PermissionDeniedError, RateLimitError, StateUnavailableError)
from llamawrapper.requests.response_cache import ResponseCache, SQLiteCache
from llamawrapper.security.audit import AuditLog
from llamawrapper.security.crypto import Cipher, new_key, parse_key
from llamawrapper.security.gate import Gate
from llamawrapper.security.keys import make_key
from llamawrapper.security.limits import LocalLimiter, RedisLimiter
from llamawrapper.security.stores import RedisKeyStore, SQLiteKeyStore
from llamawrapper.types import StreamEvent, Usage
from security_helpers import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    if server.binary is None:
        pytest.skip("redis-server is not installed")
    server.start()
    yield server
    server.stop()


def _flush(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


# -- keys ---------------------------------------------------------------------------------------------
def test_secret_shape_and_hash_only():
    key, secret = make_key({"name": "app", "models": ["smollm2"], "rpm": 5})
    assert secret.startswith("lw-") and len(secret) >= 3 + 43  # 32 bytes base64url
    assert secret not in json.dumps(key.to_record())
    assert key.allows_model("smollm2") and key.allows_model("smollm2:lora") and key.allows_model("smollm2@v2")
    assert not key.allows_model("other") and not key.allows_model(None)


@pytest.mark.parametrize("spec, param", [
    ({"name": "a", "rpm": -1}, "rpm"), ({"name": "a", "tpm": 0}, "tpm"), ({"name": "a", "max_parallel": "2"}, "max_parallel"),
    ({"name": "a", "expires_at": time.time() - 10}, "expires_at"), ({"name": "a", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ({"name": "a", "scopes": ["root"]}, "scopes"), ({"name": ""}, "name"), ({"name": "a", "models": []}, "models"),
    ({"name": "a", "admin": "yes"}, "admin"),
])
def test_bad_key_specs_name_the_field(spec, param):
    with pytest.raises(InvalidRequestError) as info:
        make_key(spec)
    assert info.value.param == param


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_stores_keep_keys_usage_and_revocations(backend, tmp_path, redis_server):
    if backend == "redis":
        _flush(redis_server.url)
    store = SQLiteKeyStore(tmp_path / "keys.sqlite") if backend == "sqlite" else RedisKeyStore(redis_server.url)
    key, secret = make_key({"name": "app", "models": ["m"], "tpm": 100, "metadata": {"team": "x"}})
    store.add(key)
    assert store.by_hash(key.secret_hash).id == key.id and store.get(key.id).metadata == {"team": "x"}
    assert store.has_keys()
    store.add_usage({key.id: {"requests": 2, "prompt_tokens": 10, "completion_tokens": 5, "last_used_at": 123.0}})
    store.add_usage({key.id: {"requests": 1, "prompt_tokens": 1, "completion_tokens": 1, "last_used_at": 124.0}})
    assert store.usage(key.id) == {"requests": 3, "prompt_tokens": 11, "completion_tokens": 6}
    assert store.get(key.id).last_used_at == 124.0
    assert store.revoke(key.id, time.time()).state() == "revoked" and store.get(key.id).state() == "revoked"
    assert store.has_keys()  # a revoked key still means "keys are required"
    with pytest.raises(KeyNotFoundError):
        store.revoke("key_nope", time.time())
    store.close()
    if backend == "sqlite":
        raw = (tmp_path / "keys.sqlite").read_bytes()
        assert secret.encode() not in raw and secret[3:].encode() not in raw


# -- limits -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["local", "redis"])
def test_rpm_sliding_window(backend, redis_server):
    if backend == "redis":
        _flush(redis_server.url)
    a = LocalLimiter() if backend == "local" else RedisLimiter(redis_server.url)
    b = a if backend == "local" else RedisLimiter(redis_server.url)  # a second process's limiter
    key, _ = make_key({"name": "k", "rpm": 5})
    t0 = 1_000_000.0
    admitted = [(a if i % 2 else b).admit(key, f"t{i}", now=t0 + i).admitted for i in range(8)]
    assert admitted == [True] * 5 + [False] * 3
    refused = a.admit(key, "late", now=t0 + 30)
    assert refused.reason == "rpm" and 29 <= refused.requests_reset <= 31  # the first request leaves the window at t0+60
    assert a.admit(key, "next", now=t0 + 60.5).admitted  # one slot free again, no burst of five


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_tpm_and_parallel(backend, redis_server):
    if backend == "redis":
        _flush(redis_server.url)
    lim = LocalLimiter() if backend == "local" else RedisLimiter(redis_server.url)
    key, _ = make_key({"name": "k", "tpm": 100, "max_parallel": 2})
    now = 2_000_000.0 * 60
    assert lim.admit(key, "a", now=now).admitted and lim.admit(key, "b", now=now).admitted
    assert lim.admit(key, "c", now=now).reason == "parallel"
    lim.release(key, "a")
    assert lim.admit(key, "c", now=now).admitted
    for t in ("b", "c"):
        lim.release(key, t)
    lim.charge(key, 120, now=now)
    over = lim.admit(key, "d", now=now + 1)
    assert over.reason == "tpm" and over.tokens == 120
    # a minute later only the overlapping share of the previous minute counts: 120 * (1 - 0.5) = 60
    later = lim.admit(key, "e", now=now + 90)
    assert later.admitted and later.tokens == 60


def test_redis_down_fails_closed_then_recovers(tmp_path):
    server = RedisServer(tmp_path)
    if server.binary is None:
        pytest.skip("redis-server is not installed")
    server.start()
    try:
        lim = RedisLimiter(server.url)
        key, _ = make_key({"name": "k", "rpm": 100})
        assert lim.admit(key, "1").admitted
        server.stop()
        with pytest.raises(StateUnavailableError):
            lim.admit(key, "2")
        server.start()
        assert lim.admit(key, "3").admitted
    finally:
        server.stop()


# -- gate ---------------------------------------------------------------------------------------------
def test_gate_auth_scopes_headers(tmp_path):
    gate = Gate(SQLiteKeyStore(tmp_path / "k.sqlite"), LocalLimiter(), AuditLog(tmp_path / "a.jsonl"),
                api_keys=["legacy"], admin_key="boot", background=False)
    key, secret = gate.create_key({"name": "app", "models": ["m1"], "rpm": 2})
    p = gate.authenticate(f"Bearer {secret}")
    assert p.key_id == key.id and not p.admin and p.allows_model("m1") and not p.allows_model("m2")
    with pytest.raises(PermissionDeniedError):
        gate.require_admin(p)
    assert gate.authenticate("Bearer boot").admin and not gate.authenticate("bearer legacy").admin
    for header in (None, "", "Bearer", "Basic abc", secret, f"Bearer {secret} x", "Bearer lw-unknown"):
        with pytest.raises(AuthenticationError):
            gate.authenticate(header)
    h = gate.admit(p, "t1")
    assert h["x-ratelimit-limit-requests"] == "2" and h["x-ratelimit-remaining-requests"] == "1"
    gate.admit(p, "t2")
    with pytest.raises(RateLimitError) as info:
        gate.admit(p, "t3")
    assert info.value.headers["x-ratelimit-remaining-requests"] == "0" and int(info.value.headers["Retry-After"]) >= 1
    gate.revoke_key(key.id)
    with pytest.raises(AuthenticationError, match="revoked"):
        gate.authenticate(f"Bearer {secret}")
    gate.close()


def test_revoking_the_last_stored_key_does_not_open_the_server(tmp_path):
    gate = Gate(SQLiteKeyStore(tmp_path / "k.sqlite"), LocalLimiter(), AuditLog(tmp_path / "a.jsonl"), background=False)
    assert not gate.enabled  # no key anywhere: an open server, as before
    key, _ = gate.create_key({"name": "only"})
    assert gate.enabled
    gate.revoke_key(key.id)
    time.sleep(0.6)
    assert gate.enabled
    gate.close()


def test_failed_auth_audit_is_rate_limited(tmp_path):
    gate = Gate(SQLiteKeyStore(tmp_path / "k.sqlite"), LocalLimiter(), AuditLog(tmp_path / "a.jsonl"), api_keys=["x"],
                background=False)
    for _ in range(500):
        gate.record_failure("Incorrect API key provided.", route="/v1/models")
    lines = list(gate.audit.lines())
    assert 10 <= len(lines) <= 20  # at most FAILURES_PER_SECOND per second, not 500
    time.sleep(1.05)
    gate.record_failure("Incorrect API key provided.")
    assert list(gate.audit.lines())[-1]["suppressed_before"] >= 400
    gate.close()


# -- audit --------------------------------------------------------------------------------------------
def _log_with(tmp_path, n: int) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(n):
        log.append("request", key_id=f"key_{i}", status=200)
    return log


def test_audit_chain_detects_edits_and_deletions(tmp_path):
    log = _log_with(tmp_path, 5)
    assert log.verify().ok and log.verify().lines == 5
    lines = log.path.read_text().splitlines()
    edited = lines.copy()
    edited[2] = edited[2].replace('"status":200', '"status":500')
    log.path.write_text("\n".join(edited) + "\n")
    result = log.verify()
    assert not result.ok and result.bad_line == 3 and "edited" in result.problem
    log.path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    result = log.verify()
    assert not result.ok and result.bad_line == 2 and "deleted" in result.problem


def test_audit_appends_from_two_writers_chain(tmp_path):
    a, b = AuditLog(tmp_path / "audit.jsonl"), AuditLog(tmp_path / "audit.jsonl")  # as two processes
    for i in range(6):
        (a if i % 2 else b).append("request", n=i)
    assert a.verify().ok and a.verify().lines == 6
    assert [e["n"] for e in a.read(key=None)] == list(range(6))


def test_audit_retention_keeps_a_verifiable_chain(tmp_path):
    log = _log_with(tmp_path, 4)
    assert log.prune(time.time() + 1) == 4 and log.verify().ok
    log.append("request", key_id="after")
    assert log.verify().ok and log.verify().lines == 1


def test_audit_verify_command(tmp_path):
    log = _log_with(tmp_path, 3)
    cmd = [sys.executable, "-m", "llamawrapper.cli", "audit", "verify", "--file", str(log.path)]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0 and "3 lines" in ok.stdout
    text = log.path.read_text().replace('"key_id":"key_1"', '"key_id":"key_9"')
    log.path.write_text(text)
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1 and "line 2" in bad.stderr and "Traceback" not in bad.stderr


# -- encryption ---------------------------------------------------------------------------------------
def test_cipher_round_trip_and_refusals():
    c = Cipher(parse_key(new_key()))
    blob = c.encrypt(b"secret answer", b"k1")
    assert b"secret answer" not in blob and c.decrypt(blob, b"k1") == b"secret answer"
    with pytest.raises(EncryptionKeyError):
        c.decrypt(blob, b"k2")  # moved under another cache key
    with pytest.raises(EncryptionKeyError):
        Cipher(parse_key(new_key())).decrypt(blob, b"k1")
    with pytest.raises(EncryptionKeyError):
        parse_key("too-short")
    assert parse_key("ab" * 32) == bytes.fromhex("ab" * 32)


def test_encrypted_response_cache_file_has_no_text(tmp_path):
    events = [StreamEvent("The capital is Paris", [1]), StreamEvent(".", [2], "stop", Usage(3, 2, 0))]
    key = new_key()
    cache = ResponseCache(SQLiteCache(tmp_path / "r.sqlite"), cipher=Cipher(parse_key(key)))
    cache.store("k", events)
    assert [e.text for e in cache.lookup("k")] == ["The capital is Paris", "."]
    cache.close()
    db = sqlite3.connect(tmp_path / "r.sqlite")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    assert b"Paris" not in (tmp_path / "r.sqlite").read_bytes()
    with pytest.raises(EncryptionKeyError, match="encrypted"):
        ResponseCache(SQLiteCache(tmp_path / "r.sqlite"))  # no key
    with pytest.raises(EncryptionKeyError, match="different key"):
        ResponseCache(SQLiteCache(tmp_path / "r.sqlite"), cipher=Cipher(parse_key(new_key())))
    again = ResponseCache(SQLiteCache(tmp_path / "r.sqlite"), cipher=Cipher(parse_key(key)))
    assert again.lookup("k")[0].text == "The capital is Paris"


def test_switching_encryption_on_drops_plaintext_entries(tmp_path):
    plain = ResponseCache(SQLiteCache(tmp_path / "r.sqlite"))
    plain.store("k", [StreamEvent("Paris", [1], "stop", Usage(1, 1, 0))])
    plain.close()
    sealed = ResponseCache(SQLiteCache(tmp_path / "r.sqlite"), cipher=Cipher(parse_key(new_key())))
    assert len(sealed.backend) == 0 and sealed.lookup("k") is None


def test_keys_cli_local_store(tmp_path):
    env = {"LLAMAWRAPPER_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "llamawrapper.cli", *args], capture_output=True, text=True, env=env)

    made = cli("keys", "create", "ci", "--model", "smollm2", "--rpm", "5", "--json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["key"].startswith("lw-") and created["models"] == ["smollm2"]
    listed = json.loads(cli("keys", "list", "--json").stdout)
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0] and "secret_hash" not in listed[0]
    assert cli("keys", "revoke", created["id"]).returncode == 0
    assert json.loads(cli("keys", "show", created["id"]).stdout)["state"] == "revoked"
    bad = cli("keys", "create", "x", "--rpm", "-1")
    assert bad.returncode == 1 and "rpm" in bad.stderr and "Traceback" not in bad.stderr
    missing = cli("keys", "show", "key_nope")
    assert missing.returncode == 1 and "key_nope" in missing.stderr
    assert created["key"].encode() not in (tmp_path / "keys.sqlite").read_bytes()
    assert cli("audit", "verify").returncode == 0


# -- retention, TLS settings, content capture ---------------------------------------------------------
def test_retention_caps_cache_ttl_and_deletes_old_entries(tmp_path):
    from llamawrapper.security.retention import capped_ttl

    assert capped_ttl(None, days=2) == 2 * 86400 and capped_ttl(3600, days=2) == 3600 and capped_ttl(None, days=None) is None
    cache = SQLiteCache(tmp_path / "r.sqlite")
    cache.put("old", b"x")
    cache._db.execute("UPDATE responses SET created = created - 3 * 86400")
    cache.put("new", b"y")
    cache.close()
    reopened = SQLiteCache(tmp_path / "r.sqlite", ttl=capped_ttl(None, days=2))
    assert reopened.get("old") is None and reopened.get("new") == b"y"


def test_tls_needs_both_files(tmp_path):
    from llamawrapper.config import ServerSettings
    from llamawrapper.server.run import _tls

    cert = tmp_path / "c.pem"
    cert.write_text("x")
    assert _tls(ServerSettings()) == {}
    with pytest.raises(InvalidRequestError) as info:
        _tls(ServerSettings(ssl_certfile=str(cert)))
    assert info.value.param == "ssl_keyfile"
    with pytest.raises(InvalidRequestError) as info:
        _tls(ServerSettings(ssl_certfile=str(cert), ssl_keyfile=str(tmp_path / "missing.pem")))
    assert info.value.param == "ssl_keyfile"


def test_logged_content_is_redacted():
    from llamawrapper.security.content import ContentCapture, request_text

    text = request_text({"messages": [{"role": "user", "content": "call +1 415 555 0100 or a.b@example.org"}]})
    assert "[PHONE]" in text and "[EMAIL]" in text and "example.org" not in text
    stream = ContentCapture()
    stream.start("text/event-stream")
    for delta in ("write to ", "x@y", ".com now"):
        stream.add(f'data: {json.dumps({"choices": [{"index": 0, "delta": {"content": delta}}]})}\n\n'.encode())
    stream.add(b"data: [DONE]\n\n")
    assert stream.text() == "write to [EMAIL] now"
