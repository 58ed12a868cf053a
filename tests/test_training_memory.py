"""A memory made by a training-mode call, continued (issue 38, item 1).

In training the official semantics give a call's last window no beacons (nothing would read them). The memory such
a call returns holds that window's raw tokens without beacons. What continuing it means:

* ``placement="append"``: the window's beacons come after its raw tokens anyway, so the continuation finishes the
  window (a step of beacons only when the call ended on the window's end) and equals one eval call over the whole
  input;
* ``placement="interleave"``: the beacons that belong between those raw tokens were never made and cannot be made
  afterwards, so continuing is refused with a ValueError before any work (it used to loop for ever appending empty
  steps, or fail with a TypeError inside a layer). `reuse.read` and ``generate()`` in training mode, whose later
  calls would continue such a memory, are refused up front.

Every case runs window by window (``group_tokens=1``) and grouped (the default budget).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny import perturb_beacons, random_ids, tiny_model

import beacon_peft
from beacon_peft import reuse
from beacon_peft.memory import BeaconMemory
from beacon_peft.schedule import RatioPicker, Scheduler

GROUPS = [1, None]  # window by window, and the device's default budget


def _model(group_tokens, **kw):
    config = beacon_peft.BeaconConfig(window=8, ratios=[4], group_tokens=group_tokens, **kw)
    model = get_peft_model(tiny_model("llama", attn="sdpa"), config)
    perturb_beacons(model)
    return model


@pytest.mark.parametrize("group_tokens", GROUPS)
@pytest.mark.parametrize("first", [48, 45])  # ends on a window's end / inside a window
def test_interleaved_training_memory_is_refused_before_any_work(first, group_tokens):
    model = _model(group_tokens).train()
    with torch.no_grad():
        memory = model(input_ids=random_ids(1, first, seed=1)).past_key_values
    before = (memory.state.rows[0], memory.get_seq_length(), [t.clone() for t in memory.state.layers[0].tensors()])
    bare = first - (first - 1) // 8 * 8
    model.eval()
    with pytest.raises(ValueError, match=rf"open window holds {bare} raw tokens read in training mode without"):
        model(input_ids=random_ids(1, 42, seed=2), **reuse.cache_kwargs(model, memory))
    assert memory.state.rows[0] == before[0] and memory.get_seq_length() == before[1]  # the memory is untouched
    for a, b in zip(memory.state.layers[0].tensors(), before[2]):
        assert torch.equal(a, b)
    model.train()  # continuing in training mode is refused alike
    with pytest.raises(ValueError, match="read in training mode without"):
        model(input_ids=random_ids(1, 42, seed=2), **reuse.cache_kwargs(model, memory))


@pytest.mark.parametrize("group_tokens", GROUPS)
@pytest.mark.parametrize("first", [48, 45])
def test_appended_training_memory_continues_as_one_call(first, group_tokens):
    model = _model(group_tokens, placement="append")
    a, b = random_ids(1, first, seed=1), random_ids(1, 42, seed=2)
    with torch.no_grad():
        model.train()
        memory = model(input_ids=a).past_key_values
        model.eval()
        tail = model(input_ids=b, **reuse.cache_kwargs(model, memory))
        whole = model(input_ids=torch.cat([a, b], 1))
    torch.testing.assert_close(tail.logits, whole.logits[:, first:], atol=2e-5, rtol=1e-4)
    one, two = whole.past_key_values, tail.past_key_values
    assert one.state.rows == two.state.rows
    for la, lb in zip(one.state.layers, two.state.layers):
        for x, y in zip(la.tensors(), lb.tensors()):
            torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("group_tokens", GROUPS)
def test_reuse_read_in_training_mode(group_tokens):
    doc = random_ids(1, 70, seed=3)
    interleaved = _model(group_tokens).train()
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        reuse.read(interleaved, doc, piece_windows=2)
    appended = _model(group_tokens, placement="append")
    trained = reuse.read(appended.train(), doc, piece_windows=2)
    evaluated = reuse.read(appended.eval(), doc, piece_windows=2)
    assert trained.state.rows == evaluated.state.rows
    for la, lb in zip(trained.state.layers, evaluated.state.layers):
        for x, y in zip(la.tensors(), lb.tensors()):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)


def test_generate_in_training_mode():
    prompt = random_ids(1, 20, seed=4)
    interleaved = _model(None).train()
    with pytest.raises(ValueError, match=r"generate\(\) in training mode"):
        interleaved.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
    appended = _model(None, placement="append")  # dropout 0: training mode generates what eval mode does
    out_train = appended.train().generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
    out_eval = appended.eval().generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(out_train, out_eval)


def test_a_step_that_makes_no_progress_raises():
    """The scheduler's guard: a state whose open window is full but can take no beacon (here a legacy memory's
    training window without its record) raises instead of planning empty steps for ever."""
    config = beacon_peft.BeaconConfig(window=8, ratios=[4])
    memory = BeaconMemory(2, 1, None, "cpu")
    row = memory.state.rows[0]
    row.win_raw, row.raw, row.tokens = 8, 8, 8  # a full open window without beacons, not recorded as such
    scheduler = Scheduler(config, memory.state, [torch.arange(5)], 5, False, RatioPicker(config, 256), "cpu")
    with pytest.raises(ValueError, match="makes no progress"):
        scheduler.plan()
