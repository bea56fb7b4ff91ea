"""Property-based fuzz of the server's own OpenAPI schema with schemathesis, on a real server
process running the tiny random model (fast): valid and invalid bodies for every operation,
a fixed, derandomized budget. No 5xx, and every response conforms to the schema. The same
server serves the model twice under two names, to show that ``model`` picks one."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from server_helpers import ServerProcess

pytestmark = pytest.mark.slow

KEY = "fuzz-key"
EXAMPLES = 10  # per operation and mode; fixed so CI time is bounded


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    srv = ServerProcess([f"tiny={tiny_model_dir}", f"tiny2={tiny_model_dir}"], "--max-queue", "64", log_path=tmp_path_factory.mktemp("fuzz") / "server.log",
                        api_key=KEY)
    try:
        yield srv.wait_ready()
    finally:
        assert srv.terminate() == 0


def _operations(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=server.headers)
    ops = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize"}
    return ops


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_schema_fuzz_no_5xx_no_schema_violation(server, mode):
    checks = [not_a_server_error]
    if mode is GenerationMode.POSITIVE:
        checks += [status_code_conformance, content_type_conformance, response_schema_conformance]
    calls = []
    for op in _operations(server):
        if mode is GenerationMode.NEGATIVE and "requestBody" not in op.definition.raw:
            continue  # nothing to make invalid
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            if isinstance(case.body, dict) and "model" in case.body and op.path.startswith("/v1/"):
                case.body["model"] = "tiny"  # reach the generation paths, not only 404s
                for name in ("top_logprobs", "logit_bias", "stream_options", "best_of"):
                    case.body.pop(name, None)  # rules across fields the schema cannot state: mostly 400s that would hide the rest
                for name in ("max_tokens", "max_completion_tokens"):  # bound the time, keep odd values
                    value = case.body.get(name)
                    if value is None or (isinstance(value, int) and value > 16):
                        case.body[name] = 16
            response = case.call_and_validate(base_url=server.url, headers=server.headers, checks=checks, timeout=120)
            calls.append((op.path, response.status_code))

        fuzz()
    assert len(calls) >= EXAMPLES
    assert all(code < 500 for _, code in calls)
    if mode is GenerationMode.POSITIVE:  # the fuzz reached generation, not only validation errors
        assert {("/v1/chat/completions", 200), ("/v1/completions", 200)} <= set(calls), sorted(set(calls))


def test_several_models_picked_by_name(server):
    with server.client() as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny", "tiny2"]
        for name in ("tiny", "tiny2"):
            r = c.post("/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200 and r.json()["model"] == name
        assert c.get("/ready").json()["models"] == {"tiny": "ready", "tiny2": "ready"}
