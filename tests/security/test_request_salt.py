"""Issue 16: the request field. ``cache_salt`` (and the API-key salt) travel from the OpenAI
endpoints' real dependency through LMDeploy's ``GenerationConfig`` and ``SamplingParam`` to the
value the scheduler reads (``request_salt.sequence_salt``)."""
from __future__ import annotations

import asyncio
import json
import pickle

import pytest

pytest.importorskip("lmdeploy")

from lmdeploy_hostcache.integration import activate as act  # noqa: E402
from lmdeploy_hostcache.integration import request_salt as rs  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def active():
    act.activate()
    assert act.status()["status"] == "active", act.status()


def test_request_salt_rules():
    assert rs.request_salt_for({}, None, from_api_key=False) == ""
    assert rs.request_salt_for({"cache_salt": "t1"}, "Bearer k", from_api_key=False) == "t1"
    k1 = rs.request_salt_for({}, "Bearer k1", from_api_key=True)
    assert k1.startswith("apikey:") and "k1" not in k1
    assert k1 != rs.request_salt_for({}, "Bearer k2", from_api_key=True)
    nested = rs.request_salt_for({"cache_salt": "x"}, "Bearer k1", from_api_key=True)
    assert nested.startswith(k1 + "/") and nested != k1
    # a caller cannot name another key's partition through the body
    assert rs.request_salt_for({"cache_salt": k1}, "Bearer k2", from_api_key=True) != k1
    for bad in (5, ["a"], "x" * (rs.MAX_SALT_CHARS + 1)):
        with pytest.raises(ValueError, match="cache_salt"):
            rs.request_salt_for({"cache_salt": bad}, None, from_api_key=False)


def _request(body: dict, auth: str | None = None):
    from starlette.requests import Request

    raw = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json")]
    if auth:
        headers.append((b"authorization", auth.encode()))
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers,
             "query_string": b""}
    sent = []

    async def receive():
        if sent:
            return {"type": "http.disconnect"}
        sent.append(1)
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request(scope, receive)


def _through_endpoint(body, auth=None):
    """The endpoint's view: run the real (patched) dependency, then build a GenerationConfig in
    the same task as LMDeploy's endpoint does, and hand it to the engine side (pickled)."""
    from lmdeploy.messages import GenerationConfig
    from lmdeploy.pytorch.messages import SamplingParam
    from lmdeploy.serve.openai.chat_completions import serving
    from lmdeploy.serve.utils import server_utils

    assert serving.validate_json_request is server_utils.validate_json_request  # the endpoint's dependency
    assert getattr(server_utils.validate_json_request, "__hostcache_wrapped__", False)

    async def endpoint():
        await server_utils.validate_json_request(_request(body, auth))
        return GenerationConfig(max_new_tokens=4)

    gen = asyncio.run(endpoint())
    param = SamplingParam.from_gen_config(pickle.loads(pickle.dumps(gen)))

    class Seq:
        sampling_param = param

    return rs.sequence_salt(Seq())


def test_cache_salt_reaches_the_sequence(monkeypatch):
    monkeypatch.delenv(rs.ENV_SALT_FROM_API_KEY, raising=False)
    assert _through_endpoint({"model": "m", "messages": [], "cache_salt": "tenant-a"}) == "tenant-a"
    assert _through_endpoint({"model": "m", "messages": []}, "Bearer k1") == ""   # unsalted as today
    from lmdeploy.messages import GenerationConfig

    assert not getattr(GenerationConfig(), "cache_salt", None)  # outside a request: nothing stamped


def test_api_key_salt_reaches_the_sequence(monkeypatch):
    monkeypatch.setenv(rs.ENV_SALT_FROM_API_KEY, "1")
    a = _through_endpoint({"model": "m", "messages": []}, "Bearer key-a")
    b = _through_endpoint({"model": "m", "messages": []}, "Bearer key-b")
    assert a and b and a != b and a == rs.salt_from_api_key("Bearer key-a")


def test_a_bad_cache_salt_is_answered_400_naming_the_field():
    from fastapi import HTTPException

    with pytest.raises(HTTPException) as err:
        _through_endpoint({"model": "m", "messages": [], "cache_salt": 12})
    assert err.value.status_code == 400 and "cache_salt" in err.value.detail


@pytest.mark.parametrize("word, on", [("", False), ("0", False), ("false", False), ("No", False), ("1", True),
                                      ("true", True), ("on", True), ("y", True), ("enabled", True), ("2", True)])
def test_salting_by_api_key_fails_safe_on_a_word_it_does_not_know(word, on, caplog):
    """'on' (or any word not meaning off) isolates tenants by key; before, only 1/true/yes did, and
    'on' silently left tenants sharing cache. An unknown word is logged once, naming the variable."""
    import logging

    rs._warned_words.discard(word.lower())
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache"):
        assert rs.salt_from_key_enabled({rs.ENV_SALT_FROM_API_KEY: word}) is on
        assert rs.salt_from_key_enabled({rs.ENV_SALT_FROM_API_KEY: word}) is on
    warned = [r for r in caplog.records if rs.ENV_SALT_FROM_API_KEY in r.getMessage()]
    assert len(warned) == (1 if word.lower() in ("enabled", "2") else 0)
