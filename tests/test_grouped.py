"""One decoder pass for many windows (`group_tokens`) equals the window-by-window loop (``group_tokens=1``).

Every mode, padding, batches, continuation, generate, hidden states, training gradients (with and without gradient
checkpointing), eager and sdpa: logits, losses, every memory part and every adapter gradient agree within fp32
summation-order tolerance; bfloat16 as close to float32 as the loop, attention dropout in distribution (dynamic
rotary embeddings: tests/test_dynamic_rope.py; a continued training-mode memory: tests/test_training_memory.py).
Inputs are long enough (several windows, rows alike) that runs of appending windows form, and each test checks which
path it exercised, so the batched-window attention cannot silently go untested.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny import perturb_beacons, random_ids, tiny_model

import beacon_peft
import beacon_peft.group as group_module

ATOL, RTOL = 2e-5, 1e-4  # fp32, summation order only (observed: <= 8e-6 on logits, <= 5e-7 on gradients)

MODES = {
    "interleave": dict(window=16, ratios=[4]),
    "interleave_mixed_sink": dict(window=16, ratios=[2, 4, 8], ratio_mix="step-random", ratio_seed=3, sink_size=2),
    "append": dict(window=16, ratios=[4], placement="append"),
    "append_expansion": dict(window=16, ratios=[4], placement="append", attention_scope="step-expansion"),
    "append_segmentation": dict(window=16, ratios=[8], placement="append", attention_scope="segmentation",
                                attend_prev=False, sink_size=1),
    "segmentation": dict(window=16, ratios=[4], attention_scope="segmentation"),
    "append_overlap": dict(window=16, stride=8, ratios=[4], placement="append"),
    "ratio0": dict(window=16, ratios=[0]),
    "mixed_with_ratio0": dict(window=16, ratios=[0, 4, 8], ratio_mix="step-random", ratio_seed=5),
    "lowrank_o": dict(window=16, ratios=[4], beacon_rank=4, beacon_projections=["q", "k", "v", "o"]),
    "adapt": dict(window=16, ratios=[2, 4, 8], ratio_mix="adapt"),
}
# modes whose steps append whole windows to the compressed memory: runs of batched windows must form
RUN_MODES = {"interleave", "interleave_mixed_sink", "append", "ratio0", "mixed_with_ratio0", "lowrank_o", "adapt"}


@pytest.fixture
def segments(monkeypatch):
    """Records the segment kinds of every group planned: 'run<G>' or 'step'."""
    seen: list[str] = []
    original = group_module.GroupPlan._segments

    def spy(self, hosts, min_run):
        out = original(self, hosts, min_run)
        seen.extend(f"run{s.run.windows}" if s.run is not None else "step" for s in out)
        return out

    monkeypatch.setattr(group_module.GroupPlan, "_segments", spy)
    return seen


def _pair(mode: dict, arch: str = "llama", attn: str = "sdpa", group_tokens: int = 4096, **model_kw):
    """The same adapter twice: window by window and grouped."""
    models = []
    for g in (1, group_tokens):
        model = get_peft_model(tiny_model(arch, attn=attn, **model_kw),
                               beacon_peft.BeaconConfig(**mode, group_tokens=g))
        perturb_beacons(model)
        models.append(model)
    return models


def _close(a, b):
    torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL)


def _same_memory(a, b):
    assert a.state.rows == b.state.rows
    assert a.state.ratio_log == b.state.ratio_log
    assert (a.state.raw_is_beacon == b.state.raw_is_beacon).all() and (a.state.raw_local == b.state.raw_local).all()
    for la, lb in zip(a.state.layers, b.state.layers):
        for x, y in zip(la.tensors(), lb.tensors()):
            assert x.shape == y.shape
            _close(x, y)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(MODES))
def test_inference_equals_window_loop(name, attn, segments):
    loop, grouped = _pair(MODES[name], attn=attn)
    ids = random_ids(2, 90, seed=5)  # rows alike: runs form; 5 full windows and a partial one
    with torch.no_grad():
        a, b = loop(input_ids=ids), grouped(input_ids=ids)
    _close(a.logits, b.logits)
    _same_memory(a.past_key_values, b.past_key_values)
    assert any(s.startswith("run") for s in segments) == (name in RUN_MODES), segments


@pytest.mark.parametrize("name", ["interleave", "interleave_mixed_sink", "append_expansion", "append_overlap"])
def test_padding_continuation_and_hidden_states(name, segments):
    loop, grouped = _pair(MODES[name])
    ids = random_ids(2, 70, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding: the rows' windows differ
    more = random_ids(2, 40, seed=8)
    outs = []
    with torch.no_grad():
        for model in (loop, grouped):
            first = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            cont = model(input_ids=more, attention_mask=torch.cat((mask, torch.ones_like(more)), 1),
                         past_key_values=first.past_key_values, output_hidden_states=True)
            outs.append((first, cont))
    for x, y in zip(outs[0], outs[1]):
        _close(x.logits, y.logits)
        assert len(x.hidden_states) == len(y.hidden_states)
        for hx, hy in zip(x.hidden_states, y.hidden_states):
            _close(hx, hy)
        _same_memory(x.past_key_values, y.past_key_values)
    # right padding too (the training collator pads on the right)
    right = torch.ones_like(ids)
    right[0, -11:] = 0
    with torch.no_grad():
        _close(loop(input_ids=ids, attention_mask=right).logits, grouped(input_ids=ids, attention_mask=right).logits)


def test_batched_rows_without_padding_run_as_windows(segments):
    loop, grouped = _pair(MODES["interleave"], arch="qwen3")
    ids = random_ids(3, 128, seed=2)  # 8 full windows per row, three rows: the per-window memory is expanded
    with torch.no_grad():
        a, b = loop(input_ids=ids), grouped(input_ids=ids)
    _close(a.logits, b.logits)
    _same_memory(a.past_key_values, b.past_key_values)
    assert "run8" in segments


@pytest.mark.parametrize("path", ["auto", "masked"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["interleave", "interleave_mixed_sink", "append", "append_expansion",
                                  "lowrank_o", "append_overlap"])
def test_training_loss_and_gradients_equal_window_loop(name, attn, path, segments, monkeypatch):
    """``auto`` on the CPU: every window's attention on its own inside one decoder pass; ``masked``: batches of
    windows through one masked call, what an accelerator runs."""
    from beacon_peft.layer import BeaconAttention

    monkeypatch.setattr(BeaconAttention, "windows_path", path)
    loop, grouped = _pair(MODES[name], attn=attn)
    ids = random_ids(2, 100, seed=3)
    results = []
    for model in (loop, grouped):
        model.train()
        torch.manual_seed(0)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(n.count("beacon_") for n in grads), "only adapter parameters train"
        results.append((loss, grads))
    (la, ga), (lb, gb) = results
    _close(la, lb)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert (ga[n] is None) == (gb[n] is None), n
        if ga[n] is not None:
            _close(ga[n], gb[n])
    assert any(s.startswith("run") for s in segments) == (name in RUN_MODES and path == "masked"), segments


@pytest.mark.parametrize("path", ["auto", "masked"])
def test_gradient_checkpointing_equals_window_loop(path, segments, monkeypatch):
    from beacon_peft.layer import BeaconAttention

    monkeypatch.setattr(BeaconAttention, "windows_path", path)
    ref, _ = _pair(MODES["interleave"])  # the window loop, without checkpointing
    _, ckpt = _pair(MODES["interleave"], group_tokens=4096)  # grouped, with checkpointing
    ckpt.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = random_ids(1, 100, seed=4)
    grads = []
    for model in (ref, ckpt):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        _close(grads[0][n], grads[1][n])
    assert any(s.startswith("run") for s in segments) == (path == "masked")


def test_generate_and_group_boundaries(segments):
    """generate() equals; a budget that cuts a call into several groups (mid-run) equals one group."""
    mode = MODES["interleave_mixed_sink"]
    loop, grouped = _pair(mode)
    _, small = _pair(mode, group_tokens=40)  # 2 windows per pass
    prompt = random_ids(1, 75, seed=9)
    with torch.no_grad():
        outs = [m.generate(input_ids=prompt, max_new_tokens=8, do_sample=False) for m in (loop, grouped, small)]
        logits = [m(input_ids=random_ids(1, 150, seed=1)).logits for m in (loop, grouped, small)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    _close(logits[0], logits[1])
    _close(logits[0], logits[2])
    assert segments.count("run2") >= 2 and any(s.startswith("run") and s != "run2" for s in segments), segments


@pytest.mark.parametrize("bad", [0, -3])
def test_group_tokens_out_of_range(bad):
    with pytest.raises(ValueError, match=r"group_tokens=.* out of range: allowed >= 1"):
        beacon_peft.BeaconConfig(window=16, ratios=[4], group_tokens=bad)


@pytest.mark.parametrize("bad", [2.5, True, "16384"])
def test_group_tokens_not_an_int(bad):
    with pytest.raises(TypeError, match="group_tokens must be an int"):
        beacon_peft.BeaconConfig(window=16, ratios=[4], group_tokens=bad)


def test_launches_do_not_grow_with_windows(monkeypatch):
    """What an accelerator runs (one masked call per run of windows): the ops dispatched by a grouped prefill do not
    depend on how many windows it holds (no per-window op) and stay within twice full attention's; the window
    loop's grow with every window. Counts are deterministic."""
    from beacon_peft.layer import BeaconAttention
    from benchmarks.efficiency.launches import count_prefill

    monkeypatch.setattr(BeaconAttention, "windows_path", "masked")
    model = get_peft_model(tiny_model("llama", attn="sdpa", max_position_embeddings=4096),
                           beacon_peft.BeaconConfig(window=16, ratios=[4], group_tokens=16384))
    counts = {n: count_prefill(model, random_ids(1, n, seed=1), full=False).total for n in (64, 256, 1024)}
    full = count_prefill(model, random_ids(1, 1024, seed=1), full=True).total
    assert counts[64] == counts[256] == counts[1024], counts
    assert counts[1024] <= 2 * full, (counts, full)
    model.peft_config["default"].group_tokens = 1
    loop = count_prefill(model, random_ids(1, 256, seed=1), full=False).total
    assert loop > 10 * counts[256]


def test_default_group_follows_the_device():
    config = beacon_peft.BeaconConfig(window=16, ratios=[4])
    assert config.group_tokens is None
    assert config.pass_tokens("cpu") == 2048 and config.pass_tokens(torch.device("cuda", 0)) == 16384
    assert beacon_peft.BeaconConfig(window=16, ratios=[4], group_tokens=64).pass_tokens("cuda") == 64


@pytest.mark.parametrize("path", ["split", "masked"])
@pytest.mark.parametrize("name", ["interleave", "interleave_mixed_sink", "ratio0", "append"])
def test_runs_form_after_a_ragged_batch(name, path, monkeypatch):
    """After a left-padded batch of ragged rows, the rows' compressed memories differ in length for good; windows
    that every row appends still run as one batch of windows (each row reading its own memory prefix, appending
    after its own entries) and equal the window loop, padding of the memory included."""
    from beacon_peft.layer import BeaconAttention

    monkeypatch.setattr(BeaconAttention, "windows_path", path)
    ragged = []
    original = group_module.GroupPlan._segments

    def spy(self, hosts, min_run):
        out = original(self, hosts, min_run)
        ragged.extend(s.run.windows for s in out if s.run is not None and not s.run.shared)
        return out

    monkeypatch.setattr(group_module.GroupPlan, "_segments", spy)
    loop, grouped = _pair(MODES[name])
    ids, more = random_ids(2, 70, seed=7), random_ids(2, 120, seed=8)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # row 1 is 9 tokens shorter: a window behind from here on
    outs = []
    with torch.no_grad():
        for model in (loop, grouped):
            first = model(input_ids=ids, attention_mask=mask)
            outs.append(model(input_ids=more, attention_mask=torch.cat((mask, torch.ones_like(more)), 1),
                              **beacon_peft.reuse.cache_kwargs(model, first.past_key_values)))
    _close(outs[0].logits, outs[1].logits)
    _same_memory(outs[0].past_key_values, outs[1].past_key_values)
    assert ragged and max(ragged) >= 5, ragged  # the continuation's whole windows ran as one ragged run


@pytest.mark.parametrize("path", ["split", "masked"])
def test_both_window_paths_equal_the_loop(path, monkeypatch, segments):
    """Inference through either attention of a run (the CPU's exact split, an accelerator's masked call)."""
    from beacon_peft.layer import BeaconAttention

    monkeypatch.setattr(BeaconAttention, "windows_path", path)
    for name in ("interleave", "interleave_mixed_sink", "ratio0"):
        loop, grouped = _pair(MODES[name])
        ids = random_ids(2, 90, seed=5)
        with torch.no_grad():
            a, b = loop(input_ids=ids), grouped(input_ids=ids)
        _close(a.logits, b.logits)
        _same_memory(a.past_key_values, b.past_key_values)
    assert any(s.startswith("run") for s in segments)


def test_bf16_grouped_is_as_close_to_float32_as_the_loop():
    """In bfloat16 the two orders round differently, so they are compared through float32: the grouped result is
    as close to the float32 window loop as the bfloat16 window loop itself is (measured here, no fixed tolerance)."""
    mode = MODES["interleave_mixed_sink"]
    ids = random_ids(1, 150, seed=6)
    reference, _ = _pair(mode)
    loop, grouped = (m.to(torch.bfloat16) for m in _pair(mode))
    with torch.no_grad():
        exact = reference(input_ids=ids).logits
        a, b = loop(input_ids=ids).logits.float(), grouped(input_ids=ids).logits.float()
    loop_error = (a - exact).abs().max().item()
    assert 0 < loop_error < 0.5  # bf16 rounding, not a broken model
    assert (b - exact).abs().max().item() <= 2 * loop_error
    assert (b - exact).abs().mean().item() <= 2 * (a - exact).abs().mean().item()


def test_dropout_grouped_equals_the_loop_in_distribution():
    """With attention dropout the two orders draw the same masks in another order, so a training loss equals the
    loop's in distribution only: over 24 seeds each, the mean losses agree within 4 standard errors, single draws
    differ, and without dropout (eval) the two agree exactly."""
    mode = MODES["interleave"]
    loop, grouped = _pair(mode, attention_dropout=0.3)
    ids = random_ids(1, 96, seed=7)
    losses = {}
    for name, model in (("loop", loop), ("grouped", grouped)):
        model.train()
        draws = []
        with torch.no_grad():
            for seed in range(24):
                torch.manual_seed(seed)
                draws.append(model(input_ids=ids, labels=ids).loss.item())
        losses[name] = torch.tensor(draws)
    a, b = losses["loop"], losses["grouped"]
    assert not torch.equal(a, b)
    error = ((a.var() + b.var()) / len(a)).sqrt().item()
    assert abs(a.mean().item() - b.mean().item()) <= 4 * error, (a.mean(), b.mean(), error)
    with torch.no_grad():
        _close(loop.eval()(input_ids=ids).logits, grouped.eval()(input_ids=ids).logits)
