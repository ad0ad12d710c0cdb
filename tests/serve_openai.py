"""`tern serve` through the official `openai` Python client (run by tests/serve.rs).

Usage: serve_openai.py BASE_URL  (the server must require the API key `k`).
Checks completions and chat, streaming and not, usage, logprobs, stop strings and the errors the
client raises; prints a closing line that the Rust test looks for.
"""

import sys

import openai

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0)

models = client.models.list()
model = models.data[0].id
assert model.endswith("tiny-packed"), model

# Completions: greedy is deterministic, and the stream carries the same text with usage at the end.
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
choice = c.choices[0]
assert c.object == "text_completion"
assert choice.finish_reason in ("length", "stop"), choice
assert c.usage.completion_tokens <= 12 and c.usage.prompt_tokens > 0, c.usage
assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
pieces, usage, finish = [], None, None
for chunk in client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage
    for ch in chunk.choices:
        pieces.append(ch.text)
        finish = ch.finish_reason or finish
assert "".join(pieces) == choice.text, (pieces, choice.text)
assert usage is not None and usage.completion_tokens == c.usage.completion_tokens, usage
assert finish == choice.finish_reason

# Legacy logprobs on completions.
lp = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
logprobs = lp.choices[0].logprobs
assert len(logprobs.tokens) == lp.usage.completion_tokens
assert all(len(t) == 3 for t in logprobs.top_logprobs)
assert all(x <= 0 for x in logprobs.token_logprobs)

# Chat: the template is applied, the reply streams, a seed repeats a sampled reply.
messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the GNU General Public License?"},
]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
assert r.object == "chat.completion"
assert r.choices[0].message.role == "assistant"
text = r.choices[0].message.content
streamed = []
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=10, temperature=0, stream=True
):
    for ch in chunk.choices:
        if ch.delta.content:
            streamed.append(ch.delta.content)
assert "".join(streamed) == text, (streamed, text)
a = client.chat.completions.create(
    model=model, messages=messages, max_completion_tokens=10, temperature=0.9, seed=42,
    logprobs=True, top_logprobs=2,
)
b = client.chat.completions.create(
    model=model, messages=messages, max_completion_tokens=10, temperature=0.9, seed=42,
)
assert a.choices[0].message.content == b.choices[0].message.content
content = a.choices[0].logprobs.content
assert len(content) == a.usage.completion_tokens and len(content[0].top_logprobs) == 2

# Errors surface as the client's exceptions.
for bad, exc in [
    (dict(max_tokens=0), openai.BadRequestError),
    (dict(temperature=-3), openai.BadRequestError),
    (dict(model="no-such-model"), openai.NotFoundError),
]:
    args = dict(model=model, prompt="x", max_tokens=2)
    args.update(bad)
    try:
        client.completions.create(**args)
    except exc as e:
        assert "error" in str(e).lower() or e.status_code >= 400
    else:
        raise AssertionError(f"{bad} was accepted")
try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
except openai.AuthenticationError:
    pass
else:
    raise AssertionError("a wrong key was accepted")

print("openai client: all checks passed")
