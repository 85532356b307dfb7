"""The proxy tokenizes a chat request exactly as the node does (LMDeploy 0.18's ``api_server``).

The node's token ids are computed here through LMDeploy's own code path: the body is parsed into
``ChatCompletionRequest`` and handed to the real ``ChatRunner.prepare`` (the response parser class the
api_server configures, ``_build_runner_generation_config``, ``create_session``), which calls the real
``AsyncEngine.preprocess``, which calls the prompt processor: a wrapper records what the real
``MultimodalProcessor.get_prompt_input`` returns and stops the request there (nothing is generated).
The tiny test tokenizer gets a Qwen3-style template that renders ``tools`` (``tojson``), tool-call
``arguments`` (a string and a dict render differently), ``enable_thinking``, ``reasoning_effort`` and a
custom ``chat_template_kwargs`` variable, so each of the node's request rewrites changes the prompt.
"""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

TEMPLATE = (
    "{% if tools %}<|system|>{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] or '' }}"
    "{% if m.tool_calls %}{% for tc in m.tool_calls %}[call {{ tc.function.name }} "
    "{% if tc.function.arguments is string %}STR {{ tc.function.arguments }}"
    "{% else %}{{ tc.function.arguments | tojson }}{% endif %}]{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}"
    "{% if reasoning_effort is defined %}[effort {{ reasoning_effort }}]{% endif %}"
    "{% if persona is defined %}[persona {{ persona }}]{% endif %}"
    "{% endif %}")

SYSTEM = "You are a helpful assistant. " * 8
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "time in a city",
                                          "parameters": {"type": "object",
                                                         "properties": {"city": {"type": "string"}}}}}


def _msgs(*extra):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "what is the weather?"}, *extra]


def _tool_history(arguments):
    return _msgs({"role": "assistant", "content": "",
                  "tool_calls": [{"id": "c1", "type": "function",
                                  "function": {"name": "get_weather", "arguments": arguments}}]},
                 {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
                 {"role": "user", "content": "thanks, and tomorrow?"})


CASES = {
    "plain": {"messages": _msgs()},
    "tools": {"messages": _msgs(), "tools": [WEATHER, CLOCK]},
    "tool_choice_function": {"messages": _msgs(), "tools": [WEATHER, CLOCK],
                             "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
    "tool_call_history_string_arguments": {"messages": _tool_history(json.dumps({"city": "Paris"})),
                                           "tools": [WEATHER]},
    "tool_call_history_dict_arguments": {"messages": _tool_history({"city": "Paris"})},
    "enable_thinking_false": {"messages": _msgs(), "enable_thinking": False},
    "chat_template_kwargs": {"messages": _msgs(), "chat_template_kwargs": {"persona": "pirate",
                                                                            "enable_thinking": False}},
    "chat_template_kwargs_win_over_enable_thinking": {"messages": _msgs(), "enable_thinking": True,
                                                      "chat_template_kwargs": {"enable_thinking": False}},
    "reasoning_effort": {"messages": _msgs(), "reasoning_effort": "high"},
    "reasoning_effort_in_kwargs": {"messages": _msgs(), "chat_template_kwargs": {"reasoning_effort": "low"}},
    "everything": {"messages": _tool_history('{"city": "Rome"}'), "tools": [WEATHER, CLOCK], "user": "u1",
                   "enable_thinking": False, "reasoning_effort": "max", "chat_template_kwargs": {"persona": "x"},
                   "session_id": 7, "max_tokens": 5, "stop": "\n", "temperature": 0.3},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lmdeploy_hostcache.testing.models import write_tiny_model

    d = write_tiny_model(tmp_path_factory.mktemp("tiny_qwen3_style"))
    cfg = d / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data["chat_template"] = TEMPLATE
    cfg.write_text(json.dumps(data))
    jinja = d / "chat_template.jinja"
    if jinja.exists():
        jinja.write_text(TEMPLATE)
    return str(d)


@pytest.fixture(scope="module")
def encoder(model_dir):
    from lmdeploy_hostcache.integration.proxy_routing import PromptEncoder

    return PromptEncoder(model_dir)


class _Stop(ValueError):
    """Raised by the recording prompt processor: the prompt is known, generate nothing."""


def _parser_class(tool_parser: str | None):
    """The response parser class the api_server configures (``api_server.set_parsers``), on a subclass so the
    registry's class is left as it is."""
    from lmdeploy.serve.parsers import ResponseParserManager

    base = ResponseParserManager.get("default")
    cls = type("NodeResponseParser", (base,), {})
    if tool_parser is not None:
        cls.set_parsers(tool_parser_name=tool_parser)
    return cls


def node_tokens(model_dir: str, body: dict, tool_parser: str | None = None) -> list[int]:
    """The token ids the node's ``/v1/chat/completions`` renders for ``body`` (LMDeploy's code path)."""
    from lmdeploy.model import get_chat_template
    from lmdeploy.serve.core.async_engine import AsyncEngine
    from lmdeploy.serve.core.chat_runner import ChatRunner, ChatRunnerOptions
    from lmdeploy.serve.core.exceptions import RequestError
    from lmdeploy.serve.openai.protocol import ChatCompletionRequest
    from lmdeploy.serve.processors.multimodal import MultimodalProcessor
    from lmdeploy.tokenizer import Tokenizer

    real = MultimodalProcessor(Tokenizer(model_dir), get_chat_template(model_dir, None))
    seen = []

    class Recording:
        async def get_prompt_input(self, **kwargs):
            seen.append(await real.get_prompt_input(**kwargs))
            raise _Stop

    session = SimpleNamespace(session_id=1, _handle=None)
    engine = SimpleNamespace(prompt_processor=Recording(), model_name="tiny",
                             session_mgr=SimpleNamespace(get=lambda sid: session, remove=lambda s: None),
                             request_logger=SimpleNamespace(log_prompt=lambda *a, **k: None))
    engine.preprocess = AsyncEngine.preprocess.__get__(engine)
    ctx = SimpleNamespace(response_parser_cls=_parser_class(tool_parser), default_gen_config={},
                          async_engine=engine, create_session=lambda sid=None: 1)
    request = ChatCompletionRequest.model_validate(body)
    # as chat_completions_v1 calls it for a request with messages
    options = ChatRunnerOptions(input_ids=None, do_preprocess=True, adapter_name=None)
    with pytest.raises(RequestError) as stopped:   # the recording processor stopped it after the prompt
        asyncio.run(ChatRunner.prepare(ctx, request, options))
    assert len(seen) == 1, stopped.value
    return list(seen[0]["input_ids"])


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("case", sorted(CASES))
def test_proxy_tokens_equal_the_nodes_for_the_same_chat_body(encoder, model_dir, case):
    body = {"model": "tiny", **CASES[case]}
    proxy = asyncio.run(encoder.encode("/v1/chat/completions", json.loads(json.dumps(body))))
    node = node_tokens(model_dir, json.loads(json.dumps(body)))
    assert proxy == node, (f"{case}: proxy {len(proxy)} tokens, node {len(node)}, "
                           f"equal on the first {_common_prefix(proxy, node)}")


@pytest.mark.parametrize("case", ["tools", "tool_choice_function", "tool_call_history_string_arguments"])
def test_the_nodes_tool_parser_does_not_change_what_the_proxy_must_render(encoder, model_dir, case):
    """A node started with ``--tool-call-parser`` (its ``adjust_request`` instead of ``dump_tools``) renders the
    same prompt: the proxy, which cannot know the node's parser, still matches it."""
    body = {"model": "tiny", **CASES[case]}
    proxy = asyncio.run(encoder.encode("/v1/chat/completions", json.loads(json.dumps(body))))
    assert proxy == node_tokens(model_dir, json.loads(json.dumps(body)), tool_parser="qwen3")


def test_the_rewrites_matter_with_this_template(encoder, model_dir):
    """The cases above are not vacuous: rendering the raw body (the proxy's old path) gives other tokens."""
    for case in ("tools", "tool_call_history_string_arguments", "enable_thinking_false", "tool_choice_function"):
        body = {"model": "tiny", **CASES[case]}
        raw = asyncio.run(encoder.processor.get_prompt_input(
            prompt=body["messages"], do_preprocess=True, tools=body.get("tools"),
            reasoning_effort=body.get("reasoning_effort"), chat_template_kwargs=body.get("chat_template_kwargs")))
        assert list(raw["input_ids"]) != node_tokens(model_dir, body), case


def test_input_ids_with_empty_messages_are_the_prompt(encoder):
    """api_server's /generate-style input: empty ``messages`` and ``input_ids`` is those ids, unrendered."""
    ids = [5, 6, 7, 8, 9]
    assert asyncio.run(encoder.encode("/v1/chat/completions", {"model": "tiny", "messages": [],
                                                               "input_ids": ids})) == ids


@pytest.mark.parametrize("body", [
    # tool-call arguments that are not JSON: the node answers 400
    {"model": "tiny", "messages": _tool_history("{not json")},
    # an allowed tool that is not in tools: the node answers 400
    {"model": "tiny", "messages": _msgs(), "tools": [WEATHER],
     "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [CLOCK]}}},
    # messages that are not a list: the node answers 422
    {"model": "tiny", "messages": "just a string"},
])
def test_a_body_the_node_rejects_is_routed_by_text_prefix_not_failed(model_dir, body):
    from lmdeploy_hostcache.integration.proxy_routing import RoutingService, _current

    from .test_routing_core import _proxy_request

    opts = dict(model=model_dir, feed_interval=1.0, feed_timeout=10.0, feed_port=None, feed_api_key=None,
                error_cooldown=10.0, balance=1.3, block_size=16, gpu_blocks=4096, host_blocks=0, feed_urls={})
    svc = RoutingService(opts)

    async def main():
        await svc.capture(_proxy_request(body, path="/v1/chat/completions"))
        return _current.get()

    with pytest.raises(Exception):   # the node's own steps refuse it
        asyncio.run(svc.encoder.encode("/v1/chat/completions", body))
    req = asyncio.run(main())
    assert req is not None and req.text_mode   # routed by text prefix, the request is not failed
    assert svc.errors == 0 and svc.status()["encode_fallbacks"] == 1
