"""The deployment's admin log (``llamawrapper.deploy.adminlog``): which admin calls it records
and how (no Ray needed; the Ray app's test replays it in a replacement replica)."""

from __future__ import annotations

import json

import pytest

from llamawrapper.deploy.adminlog import call_of, open_admin_log


def test_model_admin_calls_become_log_entries():
    body = json.dumps({"source": "/models/tiny", "traffic": 0.1}).encode()
    assert call_of("PUT", "/admin/models/chat", body) == {"action": "put", "name": "chat",
                                                         "body": {"source": "/models/tiny", "traffic": 0.1}}
    assert call_of("POST", "/admin/models/chat/promote", b"") == {"action": "promote", "name": "chat"}
    assert call_of("POST", "/admin/models/chat/rollback", b"") == {"action": "rollback", "name": "chat"}
    assert call_of("DELETE", "/admin/models/chat", b"") == {"action": "remove", "name": "chat"}
    assert call_of("PUT", "/admin/models/chat/adapters/sql", b'{"path": "/a/sql"}') == {
        "action": "adapter", "name": "chat", "adapter": "sql", "path": "/a/sql"}
    assert call_of("DELETE", "/admin/models/chat/adapters/sql", b"") == {
        "action": "adapter", "name": "chat", "adapter": "sql", "path": None}


@pytest.mark.parametrize("method,path", [("GET", "/admin/models/chat"), ("POST", "/admin/models/chat"),
                                         ("PUT", "/admin/models/chat/promote"), ("PUT", "/admin/keys/abc"),
                                         ("PUT", "/admin/models/chat/extra/path")])
def test_other_calls_are_not_recorded(method, path):
    assert call_of(method, path, b"{}") is None


def test_no_log_without_redis_state():
    assert open_admin_log(None, "abc") is None
    assert open_admin_log("sqlite:///tmp/keys.sqlite", "abc") is None  # one machine's file: nothing to share
    assert open_admin_log("redis://127.0.0.1:6379/0", None) is None  # built without build_app's id


@pytest.mark.slow
def test_a_replica_replaying_the_log_ends_where_the_one_that_answered_is(redis_server, tiny_model_dir, adapter_dirs):
    """Every kind of model admin call (put, canary put, promote, adapter put and delete, a second
    name, rollback, delete of a name) applied to one host and recorded in the admin log in a
    real Redis; a host that starts later and replays the log serves the same names, versions,
    roles, adapters and greedy answers."""
    import uuid

    from llamawrapper.deploy.adminlog import apply_call
    from llamawrapper.models.host import ModelHost
    from llamawrapper.models.loaders import default_loader

    tiny = str(tiny_model_dir)
    calls = [("PUT", "/admin/models/chat", {"source": tiny}),
             ("PUT", "/admin/models/chat", {"source": tiny, "dtype": "bfloat16", "traffic": 0.5}),
             ("POST", "/admin/models/chat/promote", None),
             ("PUT", "/admin/models/chat/adapters/sql", {"path": str(adapter_dirs["sql"])}),
             ("PUT", "/admin/models/other", {"source": tiny}),
             ("DELETE", "/admin/models/chat/adapters/sql", None),
             ("POST", "/admin/models/chat/rollback", None),
             ("PUT", "/admin/models/gone", {"source": tiny}),
             ("DELETE", "/admin/models/gone", None)]
    deployment = uuid.uuid4().hex
    answered, later = ModelHost(default_loader(), drain_timeout=5), ModelHost(default_loader(), drain_timeout=5)
    log_writer, log_reader = open_admin_log(redis_server.url, deployment), open_admin_log(redis_server.url, deployment)
    try:
        for method, path, body in calls:
            call = call_of(method, path, json.dumps(body).encode() if body is not None else b"")
            apply_call(answered, call, load_timeout=120)
            log_writer.append(call)
        assert log_reader.replay(later, load_timeout=120) == len(calls)

        def view(host):
            return {m["name"]: (m["active"], m["canary"], [(v["version"], v["dtype"], v["adapters"]) for v in m["versions"]])
                    for m in host.models()}

        assert view(later) == view(answered)
        assert set(view(later)) == {"chat", "other"}
        assert view(later)["chat"][0] == "v3"  # rolled back from v4 (sql removed) to v3 (with sql)
        assert view(later)["chat"][2][2][2] == {"sql": str(adapter_dirs["sql"])}
        for name in ("chat", "chat:sql", "other"):
            texts = [h.chat(name, [{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0).text
                     for h in (answered, later)]
            assert texts[0] == texts[1], name
        assert log_reader.replay(later) == len(calls)  # nothing new: nothing applied twice
    finally:
        for closer in (answered.close, later.close, log_writer.close, log_reader.close):
            closer()
