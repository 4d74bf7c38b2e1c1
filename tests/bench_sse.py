"""Benchmark of the SSE decoder on a realistic chat stream (not a test).

Run: ``.venv/bin/python tests/bench_sse.py [--repeat N]``

The stream is 300 ``chat.completion.chunk`` events shaped like
``tests/data/chat.sse`` (a leading ``: OPENROUTER PROCESSING`` comment, 297
content deltas, a finish chunk, a usage chunk and ``data: [DONE]``). Each case
decodes the whole stream with a fresh decoder, fed in a different chunking;
the chunks are cut before timing starts. A naive ``bytes.split(b"\\n\\n")``
over the whole stream is timed in the same run as a floor for comparison
(it parses nothing: no fields, no line-end rules, no UTF-8 decoding).

Each case runs ``--repeat`` samples (the garbage collector is off while
timing, as in :mod:`timeit`); the table shows the median events per second,
the spread (slowest and fastest sample) and the ratio to the
one-chunk-per-event case, which is how upstreams usually deliver.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

from trio_gateway.sse import SSEDecoder, SSEEvent

N_EVENTS = 300
WORDS = ["Hello", " world", ",", " this", " is", " a", " streamed", " answer", " 🙂", " é"]


def build_stream() -> tuple[bytes, list[bytes]]:
    """Return the stream and its per-item pieces (comment, then each event)."""
    base = {
        "id": "gen-1732430000-abcdef",
        "provider": "Vendor",
        "model": "vendor/model:free",
        "object": "chat.completion.chunk",
        "created": 1732430000,
    }

    def chunk(content: str, finish: str | None, **extra: object) -> bytes:
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": content},
            "finish_reason": finish,
            "native_finish_reason": finish,
            "logprobs": None,
        }
        body = json.dumps({**base, "choices": [choice], **extra}, separators=(",", ":"))
        return b"data: " + body.encode() + b"\n\n"

    pieces = [b": OPENROUTER PROCESSING\n\n"]
    pieces += [chunk(WORDS[i % len(WORDS)], None) for i in range(N_EVENTS - 3)]
    pieces.append(chunk("", "stop"))
    usage = {
        "prompt_tokens": 42,
        "completion_tokens": N_EVENTS,
        "total_tokens": 42 + N_EVENTS,
        "cost": 0.00123,
        "is_byok": False,
    }
    pieces.append(chunk("", None, usage=usage))
    pieces.append(b"data: [DONE]\n\n")
    return b"".join(pieces), pieces


def fixed_chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def decode(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    items: list[SSEEvent] = []
    for piece in chunks:
        items += decoder.feed(piece)
    items += decoder.close()
    return items


def naive_split(data: bytes) -> list[bytes]:
    return [block for block in data.split(b"\n\n") if block]


def sample(run: Callable[[], object], loops: int) -> float:
    """Seconds per call, averaged over ``loops`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(loops):
        run()
    return (time.perf_counter() - start) / loops


def calibrate(run: Callable[[], object], target: float = 0.05) -> int:
    """Loops per sample so that one sample takes about ``target`` seconds."""
    once = sample(run, 1)
    return max(1, int(target / max(once, 1e-9)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=25, help="samples per case (default 25)")
    args = parser.parse_args()

    data, pieces = build_stream()
    n_events = len(pieces) - 1  # the leading comment is not an event
    cases: list[tuple[str, list[bytes]]] = [
        ("whole stream, 1 chunk", [data]),
        ("one chunk per event", pieces),
        ("1500-byte chunks", fixed_chunks(data, 1500)),
        ("7-byte chunks", fixed_chunks(data, 7)),
    ]
    reference = decode([data])
    assert len(reference) == n_events + 1
    assert reference[-1].data == "[DONE]"
    for name, chunks in cases:
        assert decode(chunks) == reference, name
    assert len(naive_split(data)) == n_events + 1

    runs: list[tuple[str, int, Callable[[], object]]] = [
        (name, len(chunks), functools.partial(decode, chunks)) for name, chunks in cases
    ]
    runs.append(('naive data.split(b"\\n\\n")', 1, functools.partial(naive_split, data)))

    print(f"SSE decoder benchmark: {n_events} events + 1 comment, {len(data)} bytes")
    python = f"Python {platform.python_version()} on {platform.machine()}"
    print(f"{python}, {args.repeat} samples per case")
    results: dict[str, list[float]] = {}
    started = time.perf_counter()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name, _, run in runs:
            loops = calibrate(run)
            results[name] = [n_events / sample(run, loops) for _ in range(args.repeat)]
    finally:
        if gc_was_enabled:
            gc.enable()
    elapsed = time.perf_counter() - started

    per_event = statistics.median(results["one chunk per event"])
    header = (
        f"{'case':<28} {'chunks':>6} {'median ev/s':>12} {'min ev/s':>11} {'max ev/s':>11}"
        f" {'vs per-event':>12}"
    )
    print()
    print(header)
    print("-" * len(header))
    for name, n_chunks, _ in runs:
        rates = results[name]
        median = statistics.median(rates)
        print(
            f"{name:<28} {n_chunks:>6} {median:>12,.0f} {min(rates):>11,.0f} "
            f"{max(rates):>11,.0f} {median / per_event:>11.2f}x"
        )
    print(f"\n(timed for {elapsed:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
