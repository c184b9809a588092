"""The official `openai` Python SDK against a running `lethe serve` (a client nobody here wrote).

Usage: LETHE_ADMIN_KEY=... python tests/clients/openai_sdk.py http://127.0.0.1:18080
(the server started with the same LETHE_ADMIN_KEY and no tenant key issued yet).
"""

import json
import os
import sys
import urllib.request

import openai

base = sys.argv[1].rstrip("/")
client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0)

# Models list.
models = client.models.list()
assert models.data, "no models listed"
model = models.data[0].id
print(f"model: {model}")

messages = [{"role": "user", "content": "Name a colour of the sky."}]

# Chat, non-streaming.
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
assert chat.object == "chat.completion"
assert chat.choices[0].message.role == "assistant"
assert chat.choices[0].finish_reason in ("stop", "length")
assert 0 < chat.usage.completion_tokens <= 16
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
print(f"chat: {chat.choices[0].message.content!r}")

# Chat, streaming with usage: same greedy text, usage on a final chunk with no choices.
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
)
chunks = list(stream)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == chat.choices[0].message.content, (text, chat.choices[0].message.content)
assert chunks[0].choices[0].delta.role == "assistant"
assert chunks[-1].choices == [] and chunks[-1].usage is not None
assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
print(f"stream: {len(chunks)} chunks")

# Completions.
comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
assert comp.object == "text_completion" and isinstance(comp.choices[0].text, str)
print(f"completion: {comp.choices[0].text!r}")

# lethe's guidance extension through extra_body, echoed back.
guided = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=16,
    temperature=0,
    extra_body={"guidance": {"gamma": 3.0, "mode": "prob"}},
)
applied = guided.model_extra["guidance"]
assert applied["gamma"] == 3.0 and applied["mode"] == "prob" and applied["uncond"] == "negative_condition", applied
print(f"guided: {guided.choices[0].message.content!r} {applied}")

# Structured outputs: the SDK's parse helper (a pydantic model as a strict json_schema).
from pydantic import BaseModel, Field


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
parsed = parse(
    model=model,
    messages=[{"role": "user", "content": "Alice is 30. Extract the person."}],
    response_format=Person,
    max_tokens=120,
    temperature=0,
)
assert isinstance(parsed.choices[0].message.parsed, Person), parsed
print(f"parse: {parsed.choices[0].message.parsed!r}")
obj = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Describe a cat as JSON."}],
    response_format={"type": "json_object"},
    max_tokens=200,
    temperature=0,
)
if obj.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(obj.choices[0].message.content), dict), obj
print(f"json_object: {obj.choices[0].message.content!r}")

# Tool calls, streamed as OpenAI streams them (the SDK's stream helper accumulates them).
weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]},
    },
}
called = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Weather in Paris?"}],
    tools=[weather],
    tool_choice="required",
    max_tokens=60,
    temperature=0,
)
assert called.choices[0].finish_reason == "tool_calls" and called.choices[0].message.tool_calls, called
tc = called.choices[0].message.tool_calls[0]
assert tc.function.name == "get_weather" and "city" in json.loads(tc.function.arguments), tc
deltas = [
    d
    for c in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[weather],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    if c.choices
    for d in (c.choices[0].delta.tool_calls or [])
]
assert deltas[0].id and deltas[0].function.name == "get_weather", deltas[0]
assert "".join(d.function.arguments or "" for d in deltas if d.index == 0) == tc.function.arguments
print(f"tools: {tc.function.name}({tc.function.arguments})")

# Log-probabilities.
lp = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
entries = lp.choices[0].logprobs.content
assert entries and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries), entries
print(f"logprobs: {[(e.token, round(e.logprob, 3)) for e in entries]}")

# Errors surface as the SDK's own exception classes.
try:
    client.chat.completions.create(model=model, messages=messages, extra_body={"guidance": {"gamma": -1}})
    raise AssertionError("negative gamma was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "gamma" in str(e), e
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404, e
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=10**6)
    raise AssertionError("context overflow was accepted")
except openai.BadRequestError as e:
    assert e.code == "context_length_exceeded", e
try:
    client.chat.completions.create(model=model, messages=messages, extra_body={"frobnicate": 1})
    raise AssertionError("an unknown field was accepted")
except openai.BadRequestError as e:
    assert e.param == "frobnicate", e

# Tenant keys: issue one through the admin API; from then on the SDK needs it.
admin_key = os.environ["LETHE_ADMIN_KEY"]


def admin(method, path, body=None):
    req = urllib.request.Request(
        f"{base}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": f"Bearer {admin_key}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        return json.load(r)


admin("PUT", "/admin/tenants/sdk", {})
key = admin("POST", "/admin/tenants/sdk/keys")["api_key"]
try:
    client.models.list()
    raise AssertionError("an unknown key was accepted after a key was issued")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.code == "invalid_api_key", e
keyed = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
again = keyed.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
assert again.choices[0].message.content == chat.choices[0].message.content
print("tenant key: accepted; unknown key: AuthenticationError")

print("openai SDK: all checks passed")
