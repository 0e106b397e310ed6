"""A tier's blocks in several copies (``shared.runtime.copies``): the frozen weights held once, each copy's modules its
own, and a session's step on any copy, beside another session's, the same as on the one copy a tier had before."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from plans import make_plan

from shared.config.deployment import ModelSpec
from shared.model.adapters import AdapterSlots, initial_state
from shared.protocol.enums import Tier
from shared.runtime.copies import auto_copies
from shared.runtime.loss import head_loss
from shared.runtime.tier import TierRuntime

CASES = {"cloud": ("tiny-llama", "lm", Tier.CLOUD), "edge": ("tiny-bert", "cls", Tier.EDGE)}


def tensors(module: torch.nn.Module, slots: AdapterSlots | None = None) -> list[int]:
    """Every parameter and buffer of ``module`` by identity (but those in ``slots``: a session's, where one was bound)."""
    bound = {id(getattr(m, p)) for m, p in slots.locations.values()} if slots is not None else set()
    return [id(t) for t in (*module.parameters(), *module.buffers()) if id(t) not in bound]


def test_copies_share_every_weight_and_config_and_hold_modules_of_their_own(tiny) -> None:
    runtime = TierRuntime(Tier.CLOUD, tiny("tiny-llama"), ModelSpec("tiny-llama", (1, 3), "lm"), copies=3)
    with runtime.copies.quiet() as copies:
        first, *others = copies
    assert len(copies) == 3 and first.partition is runtime.partition and runtime.copies.idle() == 3
    for other in others:
        assert tensors(other.partition) == tensors(first.partition)  # the same tensors: no weight held twice
        assert other.partition.config is first.partition.config
        assert not {id(m) for m in other.partition.modules()} & {id(m) for m in first.partition.modules()}
        assert other.heads == [other.partition] and other.slots[0].keys == first.slots[0].keys
        assert all(module in dict(other.partition.named_modules()).values()
                   for module, _ in other.slots[0].locations.values())


def test_a_device_keeps_one_copy_and_auto_copies_divide_the_cores(tiny) -> None:
    user = TierRuntime(Tier.USER, tiny("tiny-llama"), ModelSpec("tiny-llama", (1, 3), "lm"), copies=4)
    assert user.copies.count == 1  # a device runs one session
    assert auto_copies("cuda", 1) == 1
    assert auto_copies("cpu", 1) >= 1 and auto_copies("cpu", 1024) == 1


@contextmanager
def one_copy_held(runtime: TierRuntime) -> Iterator[None]:
    """Another thread holds one copy of ``runtime``'s blocks (as another session's forward would) until the block ends."""
    taken, done, waited_out = threading.Event(), threading.Event(), []

    def hold() -> None:
        with runtime.copies.take():
            taken.set()
            if not done.wait(30):  # the block waited for this copy: it had no other
                waited_out.append(True)

    thread = threading.Thread(target=hold)
    thread.start()
    assert taken.wait(10)
    try:
        yield
    finally:
        done.set()
        thread.join()
    assert not waited_out


def step(runtime: TierRuntime, task: str, steps: int = 2) -> dict[str, torch.Tensor]:
    """A session's ``steps`` training steps from version 0 (the head's loss, or a gradient of ones); its adapters."""
    session = runtime.open_session(make_plan(round_id=1, user_id="u"), initial_state(runtime.slots.shapes(), 0))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 8, runtime.width, generator=g)
    mask = torch.ones(2, 8, dtype=torch.int64)
    labels = torch.randint(0, runtime.step_limits(session).classes, (2, 8) if task == "lm" else (2,), generator=g)
    for _ in range(steps):
        out = runtime.forward(session, hidden.clone().requires_grad_(True), mask, 0)
        if runtime.variant(session.plan).head is not None:
            runtime.backward(session, [runtime.head(session, out, mask, lambda parts: head_loss(task, parts, labels))],
                             [None])
        else:
            runtime.backward(session, [out], [torch.ones_like(out)])
        runtime.step(session)
    return {k: v.detach().clone() for k, v in session.params.items()}


@pytest.mark.parametrize("tier", sorted(CASES))
def test_a_step_on_a_second_copy_while_the_first_is_held_trains_as_on_one_copy(tiny, tier: str) -> None:
    model, task, which = CASES[tier]
    spec = ModelSpec(model, (1, 3), task, num_labels=0 if task == "lm" else 3)
    alone = step(TierRuntime(which, tiny(model), spec, cut=1), task)
    runtime = TierRuntime(which, tiny(model), spec, cut=1, copies=2)
    with one_copy_held(runtime):
        assert runtime.copies.idle() == 1
        beside = step(runtime, task)  # on the other copy: with one, it would wait for the held one
    assert beside.keys() == alone.keys()
    for key, value in alone.items():
        assert torch.equal(beside[key], value), key


def test_with_one_copy_a_forward_waits_for_the_held_copy(tiny) -> None:
    runtime = TierRuntime(Tier.EDGE, tiny("tiny-bert"), ModelSpec("tiny-bert", (1, 3), "cls", num_labels=3), cut=1)
    finished = threading.Event()
    with one_copy_held(runtime):
        thread = threading.Thread(target=lambda: (step(runtime, "cls", 1), finished.set()))
        thread.start()
        assert not finished.wait(0.5)
    thread.join(30)
    assert finished.is_set()


def test_an_edge_that_holds_more_blocks_reloads_every_copy(tiny) -> None:
    edge = TierRuntime(Tier.EDGE, tiny("tiny-llama"), ModelSpec("tiny-llama", (1, 3), "lm"), cut=3, copies=2)
    edge.hold_from(1)
    with edge.copies.quiet() as copies:
        assert [c.partition.layer_ids for c in copies] == [[1, 2], [1, 2]]
        assert tensors(copies[1].partition) == tensors(copies[0].partition)
    assert edge.copies.idle() == 2


def test_a_second_task_has_its_own_head_in_every_copy(tiny) -> None:
    """A cloud that trains two tasks holds each task's head in each copy: modules of the copy's own, tensors shared."""
    specs = {"trec": ModelSpec("tiny-bert", (1, 3), "cls", num_labels=6),
             "sms_spam": ModelSpec("tiny-bert", (1, 3), "cls", num_labels=2)}

    def adapters(copies: int) -> dict[str, torch.Tensor]:
        runtime = TierRuntime(Tier.CLOUD, tiny("tiny-bert"), specs["trec"], tasks=specs, copies=copies)
        plan = make_plan(round_id=1, user_id="u", data="sms_spam")
        state = dict(initial_state(runtime.slots.shapes(), 0))
        for variant in runtime.variants.values():
            state.update({variant.shared(k): v for k, v in initial_state(variant.slots.shapes(), 0).items()})
        session = runtime.open_session(plan, state)
        hidden = torch.randn(2, 8, runtime.width, generator=torch.Generator().manual_seed(0))
        mask, labels = torch.ones(2, 8, dtype=torch.int64), torch.tensor([0, 1])
        with (one_copy_held(runtime) if copies > 1 else contextlib.nullcontext()):
            out = runtime.forward(session, hidden, mask, 0)
            loss = runtime.head(session, out, mask, lambda parts: head_loss("cls", parts, labels))
            runtime.backward(session, [loss], [None])
            runtime.step(session)
        if copies > 1:
            index = runtime.variants["sms_spam"].index
            with runtime.copies.quiet() as held:
                (first, first_slots), (second, second_slots) = ((c.heads[index], c.slots[index]) for c in held)
            assert first is runtime.variants["sms_spam"].head and second is not first
            assert tensors(second, second_slots) == tensors(first, first_slots) != []
        return {k: v.detach().clone() for k, v in session.params.items()}

    alone, beside = adapters(1), adapters(2)
    assert beside.keys() == alone.keys() and any(k.startswith("head.") for k in alone)
    for key, value in alone.items():
        assert torch.equal(beside[key], value), key
