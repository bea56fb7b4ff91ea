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
