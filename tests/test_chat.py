"""A conversation whose turns flow into one beacon memory (tiny models, token ids)."""

from __future__ import annotations

import pytest
import torch
from test_reuse import W, beacon_model
from tiny import random_ids

from beacon_peft.chat import Chat
from beacon_peft.reuse import cache_kwargs

END = [5, 6]  # end-of-turn ids


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_twenty_turns_stay_bounded_and_continue_exactly(arch):
    model = beacon_model(arch)
    chat = Chat(model, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    chat.read_ids(random_ids(1, 2 * W + 3))
    sink, ratio = 1, 4
    for k in range(20):
        chat.turn(random_ids(1, 5, seed=100 + k), end_ids=END)
        tokens = len(chat.fed)
        assert chat.memory.sizes()["tokens"] == tokens
        bound = sink + (tokens // W) * (W // ratio) + W + W // ratio  # open window: raw tokens and their beacons
        assert chat.entries() <= bound, (k, chat.entries(), bound)
    assert tokens > 10 * W and chat.entries() < tokens / 2  # far more was said than is held
    # the memory is the memory of one call over everything the chat read (document, prompts, answers, end ids)
    with torch.no_grad():
        probe = random_ids(1, 4, seed=999)
        whole = model(input_ids=torch.cat((torch.tensor([chat.fed]), probe), 1)).logits[:, -4:]
        cont = model(input_ids=probe, **cache_kwargs(model, chat.memory.copy())).logits
    torch.testing.assert_close(cont, whole, atol=2e-5, rtol=1e-5)


def test_turn_k_sees_earlier_turns():
    """A fact said in turn 1 changes turn 5's logits; the same conversation without it does not have them."""
    model = beacon_model()
    doc = random_ids(1, 2 * W + 3)

    def turn5_logits(first_prompt):
        chat = Chat(model, max_new_tokens=4, pad_token_id=0, eos_token_id=None)
        chat.read_ids(doc)
        chat.turn(first_prompt, end_ids=END)
        for k in range(2, 5):
            chat.turn(random_ids(1, 5, seed=200 + k), end_ids=END)
        with torch.no_grad():
            return model(input_ids=random_ids(1, 5, seed=205), **cache_kwargs(model, chat.memory)).logits

    fact = turn5_logits(random_ids(1, 6, seed=1))
    same = turn5_logits(random_ids(1, 6, seed=1))
    other = turn5_logits(random_ids(1, 6, seed=2))
    torch.testing.assert_close(fact, same, atol=0, rtol=0)  # deterministic
    assert (fact - other).abs().max() > 1e-3


def test_chat_bad_inputs():
    model = beacon_model()
    chat = Chat(model, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="no tokenizer"):
        chat.say("hello")
    with pytest.raises(ValueError, match="1 row"):
        chat.turn(random_ids(2, 3))
    with pytest.raises(ValueError, match="nothing has been read"):
        chat.save("unused")
    with pytest.raises(TypeError, match="BeaconMemory"):
        Chat(model, memory="not a memory")
