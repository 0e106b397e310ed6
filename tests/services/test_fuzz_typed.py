"""``make test-slow``: over 100,000 generated wire messages through the decoder, the typed messages' parsers and the
step, backward and update handlers of a live in-process deployment: no crash, no 5xx. (Starts are fuzzed by
test_fuzz_http.py: a start that parses sets a device training.)

Messages are mutations of valid ones (the README's examples and the deployment's own steps, updates and reports):
a field dropped, an unknown one added, a value of another type or out of range, NaN, a tensor entry's dtype, shape,
codec or bytes changed, or the encoded bytes flipped and truncated. A handler may refuse a message (a project
``ServiceError``: 4xx, or 503 from a full edge); anything else it raises is a crash.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any, Callable, Iterator

import msgpack
import pytest

from shared.errors import ServiceError
from shared.protocol.messages import BackwardRequest, EvalReply, OutputReply, Report, StepRequest, TrainReply, Update
from shared.protocol.starts import RoundStart, UserStart
from shared.protocol.wire import decode, encode
from stack_helpers import Stack, inprocess_stack
from wire_examples import client_bytes, examples

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")]

PARSERS = (StepRequest, TrainReply, EvalReply, OutputReply, BackwardRequest, UserStart, RoundStart, Update, Report)
DECODER_MESSAGES = 70_000
HANDLER_MESSAGES = 30_000
HTTP_MESSAGES = 1_500
JUNK: list[Any] = [None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, -0.0, math.nan, math.inf, -math.inf,
                   "", "x" * 300, "train", "eval", "bogus", b"\x00\xff", [], [1, "a"], {}, {"k": [None]}, {"": {}}]


def mutate(doc: Any, rng: random.Random, depth: int = 0) -> Any:
    """A copy of a decoded message document with one thing changed somewhere inside."""
    if isinstance(doc, dict) and doc and (depth < 4 and rng.random() < 0.7):
        weights = [{"meta": 6, "tensors": 2, "kind": 1, "v": 0.2}.get(k, 1) if depth == 0 else 1 for k in doc]
        key = rng.choices(list(doc), weights)[0]
        out = dict(doc)
        choice = rng.random()
        if choice < 0.15:
            del out[key]
        elif choice < 0.25:
            out[f"x{rng.randrange(99)}"] = rng.choice(JUNK)
        else:
            out[key] = mutate(doc[key], rng, depth + 1)
        return out
    if isinstance(doc, list) and doc and rng.random() < 0.6:
        out = list(doc)
        i = rng.randrange(len(out))
        out[i] = mutate(out[i], rng, depth + 1)
        return out
    if isinstance(doc, bytes) and doc and rng.random() < 0.7:
        data = bytearray(doc)
        if rng.random() < 0.5:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            return bytes(data)
        return bytes(data[: rng.randrange(len(data))])
    if isinstance(doc, int) and not isinstance(doc, bool) and rng.random() < 0.5:
        return doc + rng.choice([-1, 1, -(10**6), 10**6, 2**31])
    return rng.choice(JUNK)


def mutated_bytes(valid: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.9:
        return msgpack.packb(mutate(msgpack.unpackb(valid, raw=False), rng), use_bin_type=True)
    data = bytearray(valid)  # the encoded bytes themselves: flipped, truncated, extended
    for _ in range(rng.randrange(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    cut = rng.random()
    return bytes(data[: rng.randrange(1, len(data))]) if cut < 0.3 else bytes(data) + (b"\x00" if cut > 0.9 else b"")


def refuse_only_as_client_errors(call: Callable[[], Any], counts: Counter, where: str) -> None:
    try:
        call()
        counts[(where, "accepted")] += 1
    except ServiceError as exc:
        assert exc.status < 500 or exc.status in (502, 503), (where, exc.status, exc.reason)
        counts[(where, exc.status)] += 1


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with inprocess_stack(tmp_path_factory.mktemp("fuzz-typed")) as s:
        yield s


def test_decoder_and_parsers_survive_100k_mutated_messages(stack: Stack) -> None:
    """70,000 messages through ``decode`` and every parser, and 30,000 through the live handlers: 100,000."""
    rng = random.Random(12)
    counts: Counter = Counter()
    seeds = [client_bytes(e) for e in examples().values()]
    for i in range(DECODER_MESSAGES):
        data = mutated_bytes(seeds[i % len(seeds)], rng)
        try:
            msg = decode(data)
        except ServiceError as exc:
            assert exc.status == 400
            counts[("decode", 400)] += 1
            continue
        parser = PARSERS[rng.randrange(len(PARSERS))]
        refuse_only_as_client_errors(lambda: parser.from_message(msg), counts, parser.__name__)
    handlers, handled, i = valid_handler_messages(stack), 0, 0
    while handled < HANDLER_MESSAGES:  # messages that reach a handler (the ones the decoder refuses come on top)
        name, handler, valid = handlers[i % len(handlers)]
        i += 1
        try:
            msg = decode(mutated_bytes(valid, rng))
        except ServiceError:
            counts[("decode", 400)] += 1
            continue
        handled += 1
        refuse_only_as_client_errors(lambda: handler(msg), counts, name)
    print(dict(sorted(counts.items(), key=str)))
    assert sum(counts.values()) >= DECODER_MESSAGES + HANDLER_MESSAGES
    assert stack.clients["cloud"].get("/healthz").status_code == 200


def test_the_msgpack_routes_answer_mutated_messages_without_5xx(stack: Stack) -> None:
    rng = random.Random(34)
    statuses: Counter = Counter()
    routes = [("edge", "step"), ("edge", "update"), ("edge", "backward"), ("cloud", "step"), ("cloud", "update"),
              ("cloud", "backward")]
    handlers = {n: v for n, _, v in valid_handler_messages(stack)}
    for i in range(HTTP_MESSAGES):
        tier, endpoint = routes[i % len(routes)]
        body = mutated_bytes(handlers[f"{tier}.{endpoint}"], rng)
        r = stack.post_msg(tier, endpoint, body, as_={"edge": "user-0", "cloud": "edge-0"}[tier])
        statuses[(tier, endpoint, r.status_code)] += 1
        assert r.status_code < 500 or r.status_code in (502, 503), (tier, endpoint, r.status_code, r.text[:200])
    print(dict(sorted(statuses.items(), key=str)))
    for tier in ("cloud", "edge", "user"):
        assert stack.clients[tier].get("/healthz").status_code == 200


def valid_handler_messages(stack: Stack) -> list[tuple[str, Callable[[Any], Any], bytes]]:
    """A valid message for each handler of the live deployment (sessions opened for the fuzzer), as bytes."""
    stack.open_sessions(900)
    step = encode(stack.step_message(900, 0))
    report = Report(900, "edge-0", "train", 0, {}).to_message()
    update = examples()["update"]
    back = BackwardRequest(900, "user-0", 0, 1.0, stack.step_message(900, 0).tensors["hidden"]).to_message()
    return [("edge.step", stack.edge.on_step, step), ("cloud.step", stack.cloud.coordinator.on_step, step),
            ("edge.update", stack.edge.on_update, client_bytes(update)),
            ("cloud.update", stack.cloud.coordinator.on_update, encode(report)),
            ("edge.backward", stack.edge.on_backward, encode(back)),
            ("cloud.backward", stack.cloud.coordinator.on_backward, encode(back))]
