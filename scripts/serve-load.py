#!/usr/bin/env python3
"""Throughput and time to first token of an OpenAI-compatible server at several concurrencies.

Drives `/v1/completions` with streaming requests through the official `openai` client, the same way
for every server (tern serve, llama-server), and prints one markdown row per concurrency:
aggregate generated tokens/s over the round's wall time, and time to first token (mean, max).

    scripts/serve-load.py --url http://127.0.0.1:8080 --streams 1,4,16 --prompt-words 24 --tokens 32

Every stream sends a different prompt of `--prompt-words` words and asks for exactly `--tokens`
tokens (`ignore_eos` for llama-server; tern's random-weight models practically never sample EOS,
and a short stream is reported). A warm-up request runs first and is not counted.
"""

import argparse
import asyncio
import random
import statistics
import sys
import time

from openai import AsyncOpenAI

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their been has when who will more no if out"
).split()


def prompt(i: int, words: int) -> str:
    # Words drawn from a generator seeded by `i`: no two requests of a run start alike, so a
    # server's prefix cache has nothing to reuse between them.
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def stream(client: AsyncOpenAI, model: str, text: str, tokens: int, seed: int, started_event=None):
    started = time.perf_counter()
    first = None
    count = 0
    response = await client.completions.create(
        model=model,
        prompt=text,
        max_tokens=tokens,
        temperature=0.8,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "n_predict": tokens},
    )
    usage = None
    async for chunk in response:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        # bitnet.cpp's llama-server streams its native chunks here (`content`, `stop`, and
        # `tokens_predicted` on the last) instead of OpenAI's `choices`.
        native = getattr(chunk, "model_extra", None) or {}
        if native.get("stop") is True and "tokens_predicted" in native:
            usage = native["tokens_predicted"]
        if chunk.choices or native.get("stop") is False:
            # A token may decode to no text yet (part of a UTF-8 character): it still counts.
            count += 1
            if first is None:
                first = time.perf_counter() - started
                if started_event is not None:
                    started_event.release()
    return first if first is not None else float("nan"), usage if usage is not None else count


async def round_of(client, model, n, words, tokens, seed):
    started = time.perf_counter()
    results = await asyncio.gather(
        *(stream(client, model, prompt(seed + i, words), tokens, seed + i) for i in range(n))
    )
    wall = time.perf_counter() - started
    ttft = [r[0] for r in results]
    generated = sum(r[1] for r in results)
    return generated / wall, statistics.mean(ttft), max(ttft), generated, n * tokens


async def probe(client, model, streams, words, tokens):
    """Time to first token of one short request on an idle server, then again while `streams`
    other streams are generating (each has its first token, and many more to go, when it arrives)."""
    idle = (await stream(client, model, prompt(7, words), 4, 7))[0]
    generating = asyncio.Semaphore(0)
    background = [
        asyncio.create_task(
            stream(client, model, prompt(500 + i, words), tokens * 4, 500 + i, generating)
        )
        for i in range(streams)
    ]
    for _ in range(streams):
        await generating.acquire()
    loaded = (await stream(client, model, prompt(8, words), 4, 8))[0]
    await asyncio.gather(*background)
    return idle, loaded


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", help="model name (default: the first /v1/models lists)")
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--label", default="")
    ap.add_argument(
        "--probe",
        type=int,
        metavar="N",
        help="instead: one short request's time to first token idle and beside N running streams",
    )
    a = ap.parse_args()
    client = AsyncOpenAI(base_url=a.url.rstrip("/") + "/v1", api_key="none", timeout=3600)
    if a.model is None:
        a.model = (await client.models.list()).data[0].id
    await stream(client, a.model, prompt(999, a.prompt_words), 4, 0)
    if a.probe is not None:
        idle, loaded = await probe(client, a.model, a.probe, a.prompt_words, a.tokens)
        print(f"| {a.label} | {idle:.2f} | {loaded:.2f} | {loaded / idle:.1f}x |", flush=True)
        return 0
    for n in (int(s) for s in a.streams.split(",")):
        rate, mean_ttft, max_ttft, got, asked = await round_of(
            client, a.model, n, a.prompt_words, a.tokens, 1000 * n
        )
        short = "" if got == asked else f" (short: {got}/{asked} tokens)"
        print(f"| {a.label} | {n} | {rate:.2f} | {mean_ttft:.2f} | {max_ttft:.2f} |{short}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
