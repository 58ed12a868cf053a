"""`beacon_peft.metrics` on inputs small enough to compute by hand: a model with known logits for the NLL-based
measures (tail NLL, key information, context gain, held-out loss), configs with and without ``head_dim`` for the KV
bytes per entry, and the answer scores."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from beacon_peft.metrics import (
    context_gain,
    digit_similarity,
    head_dim,
    key_information,
    kv_bytes_per_entry,
    kv_heads,
    score_answer,
    sequence_losses,
    tail_logits,
    tail_nll,
)

V = 10


class KnownLogits(torch.nn.Module):
    """Logit log(3) on token (t + 1) mod V after token t, 0 elsewhere (p = 3/12 = 1/4 for the rule's token, 1/12
    for any other); honours ``logits_to_keep``."""

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        logits = torch.zeros(*input_ids.shape, V)  # (B, T, V)
        logits.scatter_(2, ((input_ids + 1) % V)[..., None], math.log(3.0))
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


class Remembers(KnownLogits):
    """KnownLogits, except that after a context holding token 7 it predicts the token after a 0 as 8 with certainty
    (logit 30): a "memory" of the needle 7 that a key token 8 reads back."""

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        logits = super().forward(input_ids).logits
        if (input_ids == 7).any():
            logits[..., 8] = torch.where(input_ids == 0, 30.0, logits[..., 8])
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_tail_nll_by_hand():
    # the tail follows the rule, the context does not: only the tail is scored, its first token from the context's
    # last position
    total, count = tail_nll(KnownLogits(), [5, 5, 5, 5, 9, 0, 1, 2, 3], 4)
    assert count == 4 and total == pytest.approx(4 * math.log(4.0))
    total, count = tail_nll(KnownLogits(), [1, 2, 3, 7], 3)  # 2, 3 follow the rule, 7 does not
    assert total == pytest.approx(2 * math.log(4.0) + math.log(12.0))
    assert tail_logits(KnownLogits(), [1, 2, 3, 7], 3).shape == (3, V)
    for tail in (0, 4):
        with pytest.raises(ValueError, match=f"tail={tail} must be in \\[1, 3\\]"):
            tail_nll(KnownLogits(), [1, 2, 3, 7], tail)


def test_key_information_is_positive_when_the_context_holds_the_key_and_zero_when_not():
    own, other, key = [3, 7, 3, 0], [3, 6, 3, 0], [8]  # the needle (7 vs 6), then the question ending in 0
    got = key_information(Remembers(), own, other, key)
    assert got.own_nll == pytest.approx(0.0, abs=1e-9)  # 8 read back with certainty after its own context
    assert got.other_nll == pytest.approx(math.log(12.0))  # off the rule and not remembered: 1/12
    assert got.information == pytest.approx(got.other_nll - got.own_nll) and got.information > 0
    assert got.own_logits.shape == (1, V) and int(got.own_logits.argmax(-1)) == 8
    # a model that keeps nothing of the needle: the key costs the same after both contexts
    assert key_information(KnownLogits(), own, other, key).information == 0.0
    # a key the model reads back from the *other* context: negative
    assert key_information(Remembers(), other, own, key).information < 0


def test_context_gain_by_hand():
    # after the whole stretch (which holds a 7) the tail token 8 is certain; after only the 0 before it, 1/12
    gain = context_gain(Remembers(), [7, 5, 5, 0, 8], 1)
    assert gain.with_context_nll == pytest.approx(0.0, abs=1e-9)
    assert gain.alone_nll == pytest.approx(math.log(12.0))
    assert gain.gain == pytest.approx(math.log(12.0))
    # no memory: the context is worth nothing; per token over a longer tail
    gain = context_gain(KnownLogits(), [4, 4, 0, 1, 2], 3)
    assert gain.gain == 0.0 and gain.alone_nll == pytest.approx((math.log(12.0) + 2 * math.log(4.0)) / 3)


def test_sequence_losses_split_at_the_first_window():
    ids = torch.tensor([[1, 2, 3, 7, 8, 0]])  # predictions: 2 3 on the rule, 7 off, 8 on, 0 off (9 -> 0 is on)
    total, after, n, n_after = sequence_losses(KnownLogits(), ids, window=3)
    assert (n, n_after) == (5, 2)
    assert total == pytest.approx(3 * math.log(4.0) + 2 * math.log(12.0) - math.log(12.0) + math.log(12.0))
    assert after == pytest.approx(math.log(4.0) + math.log(12.0))  # 8 after 7 (on), 0 after 8 (off)


@pytest.mark.parametrize("fields, head, kv, per_entry", [
    # SmolLM2-135M: 30 layers, 576 hidden, 9 heads (head 64), 3 KV heads: 2 * 30 * 3 * 64 * 4 bytes in fp32
    (dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3), 64, 3, 46080),
    # head_dim set (Qwen3-style): it wins over hidden_size // heads
    (dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32), 32, 2,
     2 * 2 * 2 * 32 * 4),
    # head_dim None, no num_key_value_heads: the fallbacks (hidden // heads, every head a KV head)
    (dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, head_dim=None), 16, 4, 2 * 2 * 4 * 16 * 4),
])
def test_kv_bytes_per_entry_with_and_without_head_dim(fields, head, kv, per_entry):
    config = SimpleNamespace(**fields)
    assert head_dim(config) == head and kv_heads(config) == kv
    assert kv_bytes_per_entry(config, torch.float32) == per_entry
    assert kv_bytes_per_entry(config, torch.bfloat16) == per_entry // 2


def test_kv_bytes_per_entry_matches_a_real_cache():
    from transformers import LlamaConfig, LlamaForCausalLM

    from beacon_peft.compat import output_cache

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        cache = output_cache(model(input_ids=torch.arange(11)[None], use_cache=True))
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == 11 * kv_bytes_per_entry(config, torch.float32)


def test_score_answer():
    assert score_answer(" 68213. The pass key", "68213")
    assert score_answer("68213", "68213")
    assert not score_answer(" 682130", "68213")
    assert not score_answer(" 6821", "68213")
    assert score_answer("it is Alice's", "Alice")
    assert score_answer(" Lighthouse.", "lighthouse")  # case does not matter for words
    assert score_answer("in PORTO, then", "Porto")
    assert not score_answer(" lighthousekeeper", "lighthouse")  # nor does a longer word count
    assert not score_answer(" Portobello", "Porto")
    assert score_answer("a blue teapot", "blue teapot")  # several words


def test_digit_similarity_is_one_minus_the_edit_distance_of_the_first_digit_run():
    assert digit_similarity(" 68213. Remember it", "68213") == 1.0
    assert digit_similarity(" 9376. Remember it", "93765") == pytest.approx(0.8)  # one digit dropped
    assert digit_similarity(" 9199.", "91519") == pytest.approx(0.6)  # 5 dropped, 1 -> 9: two edits
    assert digit_similarity(" 267. 12345", "26755") == pytest.approx(0.6)  # only the first run counts
    assert digit_similarity(" 68312", "68213") == pytest.approx(0.6)  # two substitutions
    assert digit_similarity("the way that you want", "68213") == 0.0
    assert digit_similarity(" 1234567890123", "68213") == 0.0  # floored at 0
    with pytest.raises(ValueError, match="answer='Alice'"):
        digit_similarity("Alice", "Alice")
