"""Rotary embeddings whose tables depend on each call's largest position (dynamic NTK, longrope; issue 38, item 2).

transformers recomputes ``inv_freq`` from the largest position a rotary call sees. Grouped execution makes one
rotary call per decoder pass, so every window of a pass would be rotated with the pass's last position, and the
result would depend on the pass budget (2,048 tokens on a CPU, 16,384 on an accelerator). For such models a pass
holds one window step (`forward.pass_budget`): the outputs equal the window loop's, whatever ``group_tokens`` says.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny import perturb_beacons, random_ids, tiny_model

import beacon_peft
from beacon_peft.forward import pass_budget, rope_depends_on_length

ROPES = {
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
    "longrope": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                 "long_factor": [2.0 + i for i in range(8)], "original_max_position_embeddings": 24},
}


def _model(rope: dict, ratio: int, group_tokens: int):
    model = tiny_model("llama", attn="sdpa", max_position_embeddings=48, rope_parameters=dict(rope))
    peft_model = get_peft_model(model, beacon_peft.BeaconConfig(window=16, ratios=[ratio], group_tokens=group_tokens))
    perturb_beacons(peft_model)
    return peft_model


@pytest.mark.parametrize("ratio", [2, 0])
@pytest.mark.parametrize("rope", list(ROPES))
def test_length_dependent_rope_grouped_equals_window_loop(rope, ratio):
    ids = random_ids(1, 200, seed=3)  # far past the 48 native positions at ratio 0, past 24 at ratio 2
    outs = []
    for g in (1, 4096):
        model = _model(ROPES[rope], ratio, g)
        with torch.no_grad():
            out = model(input_ids=ids)
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs.append((out, loss.detach(), grads))
    (a, la, ga), (b, lb, gb) = outs
    assert torch.equal(a.logits, b.logits)  # one window step per pass either way: the same computation
    for x, y in zip(a.past_key_values.state.layers, b.past_key_values.state.layers):
        for u, v in zip(x.tensors(), y.tensors()):
            assert torch.equal(u, v)
    assert torch.equal(la, lb) and ga.keys() == gb.keys()
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


def test_only_length_dependent_rope_gives_up_grouping():
    config = beacon_peft.BeaconConfig(window=16, ratios=[2], group_tokens=4096)
    for rope in ROPES.values():
        rotary = tiny_model("llama", max_position_embeddings=48, rope_parameters=dict(rope)).model.rotary_emb
        assert rope_depends_on_length(rotary) and pass_budget(config, rotary, "cpu") == 1
    for plain in ({"rope_type": "default", "rope_theta": 1e4},
                  {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                  {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4, "original_max_position_embeddings": 24}):
        rotary = tiny_model("llama", max_position_embeddings=48, rope_parameters=plain).model.rotary_emb
        assert not rope_depends_on_length(rotary) and pass_budget(config, rotary, "cpu") == 4096
