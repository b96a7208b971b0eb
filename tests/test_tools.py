"""Tool calling and structured output through `lmforge serve`: the prompt with tools equals transformers'
apply_chat_template; replies are parsed in the template's format (whole and streamed); "required", a named
function and response_format are kept to by constrained decoding (jsonschema validates every reply); a model
taught one tool call makes it for the official `openai` client and for LangChain's ChatOpenAI; bad requests are
400s naming the field."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
from test_server import MODEL, build_model_dir, serving
from train_helpers import memorize

from lmforge.checkpoint import load_model, save_model
from lmforge.infer.grammar import json_grammar
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.tools import ToolStream, parse_tool_calls, tool_format
from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}}}}
ASK = [{"role": "user", "content": "Weather in Verona?"}]


# -- parsing -------------------------------------------------------------------------------------------------

def test_the_format_is_chosen_from_the_template():
    assert tool_format(CHATML_TEMPLATE) == "hermes"
    assert tool_format("{{ '<|python_tag|>' }}{% for t in tools %}{{ t }}{% endfor %}") == "llama3_json"
    assert tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None


HERMES_CASES = {
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Verona"}}\n</tool_call>':
        ("Let me check.", [("get_weather", {"city": "Verona"})]),
    '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"x": 1}}'
    '\n</tool_call>': (None, [("a", {}), ("b", {"x": 1})]),
    '<tool_call>\n{"name": "a", "arguments": {"x": }\n</tool_call>': (None, None),  # broken JSON: content
    '<tool_call>\n{"arguments": {}}\n</tool_call>': (None, None),  # no name
    '<tool_call>\n{"name": "a", "arguments": {}}': (None, None),  # never closed (a reply cut by max_tokens)
    '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call> and more': ("and more", [("a", {})]),
    'A <tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": 1}\n</tool_call>':
        ('A \n<tool_call>\n{"name": 1}\n</tool_call>', [("a", {})]),  # the broken block is content
    "Just text.": (None, None),
}


@pytest.mark.parametrize("text", list(HERMES_CASES))
def test_hermes_replies_parse_whole_and_streamed_alike(text):
    content, calls = parse_tool_calls(text, "hermes")
    want_content, want_calls = HERMES_CASES[text]
    if want_calls is None:
        assert (content, calls) == (text, [])
    else:
        assert content == want_content
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == want_calls
        assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    rng = random.Random(len(text))
    for _ in range(5):  # streamed in random pieces: the same content and calls
        stream, deltas, at = ToolStream("hermes"), [], 0
        while at < len(text):
            size = rng.randint(1, 7)
            deltas += stream.feed(text[at:at + size])
            at += size
        deltas += stream.finish()
        streamed = "".join(d.get("content", "") for d in deltas)
        got = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in got] == \
               [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
        assert [c["index"] for c in got] == list(range(len(got)))
        if calls:
            assert "".join(streamed.split()) == "".join((content or "").split())
        else:
            assert streamed == text


def test_llama3_json_replies():
    content, calls = parse_tool_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; '
                                      '{"name": "get_time", "parameters": {"zone": 1}}', "llama3_json")
    assert content is None and [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Rome"},
                                                                                          {"zone": 1}]
    assert parse_tool_calls("The weather is fine.", "llama3_json") == ("The weather is fine.", [])
    assert parse_tool_calls('{"name": "x", "parameters": {"a": 1}', "llama3_json")[1] == []
    stream = ToolStream("llama3_json")
    assert stream.feed('{"name": "get_time", ') == []  # held: JSON may be a call
    assert stream.feed('"parameters": {"zone": 3}}') == []
    (delta,) = stream.finish()
    assert json.loads(delta["tool_calls"][0]["function"]["arguments"]) == {"zone": 3}
    prose = ToolStream("llama3_json")
    assert prose.feed("Sunny") == [{"content": "Sunny"}]


# -- the prompt ----------------------------------------------------------------------------------------------

def test_prompt_with_tools_and_tool_messages_equals_transformers(live):
    from transformers import PreTrainedTokenizerFast

    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Verona", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    ids = live_tokenize(live, history, [WEATHER, TIME])
    tokenizer = live.engine.tokenizer
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, chat_template=tokenizer.chat_template)
    reference = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(
        c["function"]["arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in history]
    assert ids == hf.apply_chat_template(reference, tools=[WEATHER, TIME], add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def live_tokenize(live, messages, tools) -> list[int]:
    """The prompt the server builds for a chat request, through the handler's own code path."""
    from lmforge.infer.chat_api import chat_prompt, tool_plan
    from lmforge.infer.openai_api import ChatCompletionRequest
    from lmforge.infer.server import Server

    req = ChatCompletionRequest.model_validate({"model": MODEL, "messages": messages, "tools": tools})
    server = Server(live.engine, MODEL)
    return chat_prompt(server, req.messages, tools=tool_plan(server, req).tools)


# -- constrained replies over the API -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with serving(build_model_dir(tmp_path_factory.mktemp("tools"), context=2048)) as server:
        yield server


def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)


def check_call(call, tools) -> None:
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choice_always_give_valid_calls(live, stream):
    api = client(live)
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        for seed in range(3):
            kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, seed=seed,
                          temperature=1.0, max_tokens=200, parallel_tool_calls=False)
            if stream:
                calls: dict[int, dict] = {}
                finish = None
                for chunk in api.chat.completions.create(stream=True, **kwargs):
                    delta = chunk.choices[0].delta
                    for c in delta.tool_calls or []:
                        entry = calls.setdefault(c.index, {"name": "", "arguments": ""})
                        entry["name"] += c.function.name or ""
                        entry["arguments"] += c.function.arguments or ""
                    finish = chunk.choices[0].finish_reason or finish
                got = [openai.types.chat.chat_completion_message_function_tool_call.Function(**c)
                       for c in calls.values()]
                assert finish == "tool_calls" and got
                for function in got:
                    check_call(type("Call", (), {"function": function}), [WEATHER, TIME])
                    assert choice == "required" or function.name == "get_time"
            else:
                answer = api.chat.completions.create(**kwargs).choices[0]
                assert answer.finish_reason == "tool_calls" and answer.message.tool_calls
                for call in answer.message.tool_calls:
                    check_call(call, [WEATHER, TIME])
                    assert choice == "required" or call.function.name == "get_time"


def test_response_format_json_schema_and_json_object(live):
    api = client(live)
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 120}}}
    for seed in range(4):
        reply = api.chat.completions.create(
            model=MODEL, messages=ASK, seed=seed, temperature=1.0, max_tokens=100,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    reply = api.chat.completions.create(model=MODEL, messages=ASK, seed=0, max_tokens=200,
                                        response_format={"type": "json_object"}, temperature=0.0)
    text = reply.choices[0].message.content
    assert text.startswith("{")  # a random model may not close it in 200 tokens, but never leaves JSON
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_the_engine_keeps_each_sample_to_its_grammar(live):
    """Two requests with different grammars and one without, batched: each sample keeps to its own."""
    engine, tokenizer = live.engine, live.engine.tokenizer
    prompt = tokenizer.encode_chat(ASK, add_generation_prompt=True)[0]
    digits = json_grammar({"type": "integer", "minimum": 100, "maximum": 999})
    words = json_grammar({"enum": ["alpha", "beta", "gamma"]})
    outputs = engine.generate([prompt] * 3, [SamplingParams(max_tokens=20, temperature=1.0, seed=1, grammar=digits),
                                             SamplingParams(max_tokens=20, temperature=1.0, seed=1, grammar=words),
                                             SamplingParams(max_tokens=5, temperature=1.0, seed=1)])
    assert 100 <= json.loads(outputs[0][0].text) <= 999
    assert json.loads(outputs[1][0].text) in ("alpha", "beta", "gamma")
    free = engine.generate([prompt], SamplingParams(max_tokens=5, temperature=1.0, seed=1))[0][0]
    assert outputs[2][0].token_ids == free.token_ids  # an unconstrained neighbour is untouched


BAD = {
    "duplicate names": ({"tools": [WEATHER, WEATHER]}, "tools", "two functions of the same name"),
    "unknown named function": ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
                               "tool_choice", "not in 'tools'"),
    "required without tools": ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    "a schema llguidance refuses": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}},
        "response_format", "Invalid schema"),
    "json_schema without its schema field": ({"response_format": {"type": "json_schema"}},
                                             "response_format.json_schema", "needs its 'json_schema'"),
    "a bad function name": ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", "pattern"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tool_requests_are_400s_naming_the_field(live, case):
    extra, param, words = BAD[case]
    with pytest.raises(openai.BadRequestError) as error:
        client(live).chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **extra)
    body = error.value.body
    assert (body.get("param") or "").startswith(param) and words in body["message"], body


# -- a model that has learned a call ------------------------------------------------------------------------

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Verona", "unit": "celsius"}}}


def taught(model_dir, out, steps: int = 120):
    """The tiny model trained on one chat until it answers ASK with the get_weather call (greedy)."""
    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir)
    ids, mask = tokenizer.encode_chat([*ASK, {"role": "assistant", "content": "", "tool_calls": [CALL]}],
                                      tools=[WEATHER, TIME])
    return save_model(memorize(model, ids, mask, steps, 3e-3), out, tokenizer_dir=model_dir)


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    root = tmp_path_factory.mktemp("caller")
    with serving(taught(build_model_dir(root, context=2048), root / "taught"), max_batch_size=4) as server:
        yield server


def test_auto_parses_a_learned_call_for_the_openai_client(caller):
    api = client(caller)
    reply = api.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Verona", "unit": "celsius"}
    streamed = list(api.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                                stream=True))
    deltas = [c.choices[0].delta.tool_calls[0] for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [("get_weather", call.function.arguments)]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice "none": the same text comes back as content, unparsed
    plain = api.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="none",
                                        temperature=0).choices[0]
    assert plain.finish_reason == "stop" and "<tool_call>" in plain.message.content and not plain.message.tool_calls


def test_langchain_chat_openai_receives_the_call(caller):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: str) -> str:
        """The weather in a city."""
        return json.dumps({"city": city, "temp": 21, "unit": unit})

    llm = ChatOpenAI(model=MODEL, base_url=caller.url + "/v1", api_key="none", temperature=0, max_retries=0)
    message = llm.bind_tools([WEATHER, TIME]).invoke([HumanMessage(ASK[0]["content"])])
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather",
                                                                     {"city": "Verona", "unit": "celsius"})]
    result = get_weather.invoke(message.tool_calls[0]["args"])
    follow = llm.bind_tools([WEATHER, TIME]).invoke([HumanMessage(ASK[0]["content"]), message,
                                                    ToolMessage(result, tool_call_id=message.tool_calls[0]["id"])])
    assert isinstance(follow.content, str)  # the tool's answer went back through the template and a reply came
