"""The API server's continuous batching against one request at a time, on the same prompts, in one invocation.

    python bench/api_batching.py smollm2-135m-instruct --clients 8 --max-tokens 64

Starts `tuneforge api`'s application on a free loopback port, then (1) asks the prompts one after another,
(2) asks them all at once from separate streaming clients (the official `openai` client), and (3) times the first
token of one more request that arrives while the others decode. Prints tokens/s of both, their ratio, whether the
answers are identical (greedy), and the waits. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.unit.serve.live import live_server  # noqa: E402
from tuneforge.infer.engine import Engine  # noqa: E402

PROMPTS = ["Who are you?", "Write two sentences about the sea.", "Explain what a neural network is.",
           "Give me three tips for learning a language.", "What is the capital of France, and why is it famous?",
           "Describe a cat to someone who has never seen one.", "How do I make a cup of tea?",
           "Tell me a short story about a robot.", "What are the seasons of the year?", "Why is the sky blue?",
           "Name five fruits and their colours.", "What does a fine-tuned model learn?",
           "Summarise the water cycle.", "Write a haiku about autumn.", "What is 12 times 12?",
           "Give advice to a new programmer."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", default="smollm2-135m-instruct", help="run directory or model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    import openai

    engine = Engine.load(args.target)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.clients)]
    with live_server(engine, model_name="bench", max_batch=args.clients + 1) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

        def ask(prompt, stream=False):
            return client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                                  temperature=0, max_tokens=args.max_tokens, stream=stream)

        ask("warm up")
        started = time.perf_counter()
        replies = [ask(p) for p in prompts]
        sequential_s = time.perf_counter() - started
        sequential = [r.choices[0].message.content for r in replies]
        tokens = sum(r.usage.completion_tokens for r in replies)

        results, first_token = {}, {}
        barrier = threading.Barrier(len(prompts) + 1)

        def stream(i):
            barrier.wait()
            begin, parts = time.perf_counter(), []
            for chunk in ask(prompts[i], stream=True):
                if chunk.choices and chunk.choices[0].delta.content and i not in first_token:
                    first_token[i] = time.perf_counter() - begin
                parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            results[i] = "".join(parts)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        barrier.wait()
        started = time.perf_counter()
        while len(first_token) < len(prompts) and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        joining = time.perf_counter()  # everyone is decoding: one more request arrives now
        late = ask(prompts[0], stream=True)
        late_first = next(c for c in late if c.choices and c.choices[0].delta.content)
        late_wait = time.perf_counter() - joining
        for _ in late:
            pass
        for t in threads:
            t.join()
        concurrent_s = time.perf_counter() - started
        same = [results[i] for i in range(len(prompts))] == sequential
        largest = app.state.batcher.largest_batch
        del late_first

    print(f"\n{args.target}: {len(prompts)} chat requests, greedy, at most {args.max_tokens} tokens each "
          f"({tokens} tokens generated)")
    print(f"{'mode':<34}{'seconds':>9}{'tokens/s':>10}")
    print(f"{'one at a time':<34}{sequential_s:>9.2f}{tokens / sequential_s:>10.1f}")
    print(f"{f'{len(prompts)} concurrent streams':<34}{concurrent_s:>9.2f}{tokens / concurrent_s:>10.1f}")
    print(f"speed-up {sequential_s / concurrent_s:.2f}x; answers identical to one-at-a-time: {same}; "
          f"largest batch {largest}")
    print(f"first token: median {statistics.median(first_token.values()):.2f} s for the {len(prompts)} streams; "
          f"{late_wait:.2f} s for a request arriving while they decode")


if __name__ == "__main__":
    main()
