"""The bookkeeping alone (no model): chunk layouts, positions and masks against the official semantics.

Interleave is compared tensor by tensor with the official per-step inputs stored in tests/fixtures/reference
(`step{i}.input_ids/position_ids/beacon_indices/attention_allowed`); the other modes against the numbers
tests/fixtures/reference/MODES.md gives (append, step-expansion, window 32, ratio 8) and, where the official code
crashes (segmentation, stride < window), against the semantics documented in docs/semantics.md.
"""

from __future__ import annotations

import pytest
import torch
from reference import VARIANTS, inputs, outputs, require_reference

from beacon_peft import BeaconConfig
from beacon_peft.masks import build_mask
from beacon_peft.memory import BeaconMemory, Take, select_entries
from beacon_peft.schedule import RatioPicker, Scheduler


def run(config: BeaconConfig, calls: list[int], training: bool = False):
    """Plan ``calls`` consecutive calls of the given lengths; returns (plan, allowed, full positions) per step."""
    state = BeaconMemory(1, 1, rope=None).state
    picker = RatioPicker(config, 512)
    steps = []
    for n in calls:
        scheduler = Scheduler(config, state, [torch.arange(n)], n, training, picker, "cpu")
        while True:
            rows = [(r.sink, r.comp) for r in state.rows]
            plan = scheduler.plan()
            if plan is None:
                break
            mask = build_mask(plan.mask, config, torch.float32)
            S, C, R = plan.mask.widths
            sink, comp = rows[0]
            positions = torch.cat((torch.arange(S), sink + torch.arange(C), plan.inputs.mem_positions[0, S:],
                                   plan.inputs.position_ids[0]))
            steps.append((plan, (mask[0, 0] == 0), positions))
    return steps, state


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_interleave_steps_match_official_inputs(variant, mode):
    require_reference()
    tensors, meta = outputs(variant)
    ids = inputs()["seq200"][0]
    config = BeaconConfig(window=64, **VARIANTS[variant])
    steps, state = run(config, [200], training=mode == "train")
    prefix = f"a_seq200_{mode}"
    assert len(steps) == len(meta[prefix]["steps"])
    for i, (plan, allowed, positions) in enumerate(steps):
        chunk_ids = torch.where(plan.inputs.is_beacon[0], 256, ids[plan.inputs.input_cols[0]])
        assert torch.equal(chunk_ids, tensors[f"{prefix}.step{i}.input_ids"][0])
        assert torch.equal(plan.inputs.is_beacon[0].long(), tensors[f"{prefix}.step{i}.beacon_indices"])
        assert torch.equal(positions, tensors[f"{prefix}.step{i}.position_ids"][0])
        assert torch.equal(allowed, tensors[f"{prefix}.step{i}.attention_allowed"][0, 0].bool())


def _layout(steps):
    return [(int(p.mask.valid.sum()), int(p.mask.sink_len[0] + p.mask.comp_len[0] + p.mask.raw_len[0]),
             int(p.mask.is_beacon.sum())) for p, _, _ in steps]


def _sizes(state):
    row = state.rows[0]
    return row.sink, row.comp, row.raw


def _beacon_positions(step):
    plan, _, _ = step
    return plan.inputs.position_ids[0][plan.inputs.is_beacon[0]].tolist()


def test_append_full_coverage():
    config = BeaconConfig(window=64, ratios=[4], placement="append")
    steps, state = run(config, [200])
    assert _layout(steps) == [(80, 0, 16), (80, 16, 16), (80, 32, 16), (8, 48, 0)]
    assert _sizes(state) == (0, 48, 8)
    assert _beacon_positions(steps[0]) == list(range(64, 80))
    assert _beacon_positions(steps[2]) == list(range(96, 112))
    plan, allowed, _ = steps[1]
    beacons = plan.inputs.is_beacon[0].nonzero().squeeze(1)
    # beacon j sees all memory, every raw token of its window and beacons 0..j (plain causal)
    assert allowed[beacons[0], : 16 + 64 + 1].all() and not allowed[beacons[0], 16 + 64 + 1 :].any()
    train, state = run(config, [192], training=True)
    assert _sizes(state) == (0, 32, 64)
    _, state = run(config, [192])
    assert _sizes(state) == (0, 48, 0)


@pytest.mark.parametrize("attend_prev", [True, False])
def test_append_step_expansion_positions_and_mask(attend_prev):
    config = BeaconConfig(window=64, ratios=[4], placement="append", attention_scope="step-expansion",
                          attend_prev=attend_prev)
    steps, _ = run(config, [200])
    step = 5 if attend_prev else 4
    offset = 1 if attend_prev else 0
    for w, start in ((0, 0), (1, 16), (2, 32)):
        assert _beacon_positions(steps[w]) == [start + (j + 1) * step - offset for j in range(16)]
    plan, allowed, _ = steps[1]  # memory: 16 beacons of window 0, then the 64 raw tokens and 16 beacons
    for j in (0, 7, 15):
        row = allowed[64 + j]
        assert row[:16].all()  # earlier windows' beacons
        assert row[16 : 16 + (j + 1) * 4].all() and not row[16 + (j + 1) * 4 : 16 + 64].any()
        own = row[16 + 64 :]
        expected = [(k <= j) if attend_prev else (k == j) for k in range(16)]
        assert own.tolist() == expected
    # raw tokens keep plain causal attention
    assert allowed[10, : 16 + 11].all() and not allowed[10, 16 + 11 :].any()


def test_append_window_completed_by_decoding_keeps_positions():
    config = BeaconConfig(window=64, ratios=[4], placement="append", attention_scope="step-expansion")
    steps, state = run(config, [120] + [1] * 20)
    layouts = _layout(steps)
    assert layouts[:2] == [(80, 0, 16), (56, 16, 0)]
    flush = [i for i, (n, _, b) in enumerate(layouts) if b == 16 and i > 0][0]
    assert layouts[flush] == (17, 79, 16)  # [t_127, 16 beacons] at memory 79
    assert _beacon_positions(steps[flush]) == [16 + (j + 1) * 5 - 1 for j in range(16)]
    assert _sizes(state) == (0, 32, 12)


def test_append_segmentation_mask():
    config = BeaconConfig(window=64, ratios=[4], placement="append", attention_scope="segmentation")
    steps, _ = run(config, [128])
    plan, allowed, _ = steps[1]
    for j in (0, 5, 15):
        row = allowed[64 + j]
        assert row[:16].all()
        window = row[16 : 16 + 64]
        assert window.nonzero().squeeze(1).tolist() == list(range(4 * j, 4 * j + 4))
        assert row[16 + 64 :].tolist() == [k <= j for k in range(16)]
    assert _beacon_positions(steps[1]) == [16 + (j + 1) * 5 - 1 for j in range(16)]


@pytest.mark.parametrize("scope", ["full-coverage", "step-expansion"])
def test_append_overlapping_windows(scope):
    config = BeaconConfig(window=64, stride=32, ratios=[4], placement="append", attention_scope=scope)
    steps, state = run(config, [200])
    assert _layout(steps) == [(72, 0, 8), (40, 40, 8), (40, 48, 8), (40, 56, 8), (40, 64, 8), (8, 72, 0)]
    assert _sizes(state) == (0, 40, 40)  # 5 windows x 8 beacons; the 32-token overlap + 8 new raw tokens
    plan, allowed, _ = steps[1]  # memory: 8 beacons, then the 32 overlap raw tokens; chunk: 32 raw + 8 beacons
    if scope == "step-expansion":
        for j in (0, 7):  # beacons cover the first `stride` raw tokens of the window: the ones that leave
            row = allowed[32 + j]
            window = torch.cat((row[8:40], row[40 : 40 + 32]))
            assert window.nonzero().squeeze(1).tolist() == list(range(4 * (j + 1)))
    else:
        assert allowed[32 + 7, : 8 + 32 + 32].all()


def test_window_32_ratio_2_sink_1():
    config = BeaconConfig(window=32, ratios=[2], sink_size=1)
    steps, state = run(config, [200])
    assert _layout(steps) == [(48, m, 16) for m in (0, 17, 33, 49, 65, 81)] + [(12, 97, 4)]
    assert _sizes(state) == (1, 96, 12)
    assert _beacon_positions(steps[1]) == [1 + 16 + 3 * (j + 1) - 1 for j in range(16)]
    _, state = run(config, [200], training=True)
    assert _sizes(state) == (1, 96, 8)


def test_ratio_8_sink_1():
    config = BeaconConfig(window=64, ratios=[8], sink_size=1)
    steps, state = run(config, [200])
    assert _layout(steps)[1][1] == 9
    assert _beacon_positions(steps[1]) == [17 + 9 * j for j in range(8)]
    assert _layout(steps)[-1] == (9, 25, 1)  # the 8-token partial window: one beacon, after its last token
    _, state = run(config, [150])
    assert _sizes(state) == (1, 16, 24)
    steps, state = run(config, [120] + [1] * 10)
    assert _sizes(state)[:2] == (1, 16)
    flush = [i for i, (n, m, b) in enumerate(_layout(steps)) if m == 79]
    assert flush and _layout(steps)[flush[0]] == (2, 79, 1)


def test_select_entries_shortcuts_equal_the_gather_they_stand_for():
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 6, 5)  # (B, H, T, D): an old part and a step's entries
    assert select_entries(a, b, Take.KEEP) is a  # nothing copied
    assert torch.equal(select_entries(a, b, Take.CAT), select_entries(a, b, torch.arange(10).expand(2, 10)))
    assert select_entries(a, b, Take.EMPTY).shape == (2, 3, 0, 5)
    index = torch.tensor([[0, 5, 9], [4, 1, 2]])  # row-wise picks out of cat(a, b)
    picked = select_entries(a, b, index)
    assert torch.equal(picked[1, :, 0], b[1, :, 0]) and torch.equal(picked[0, :, 2], b[0, :, 5])
    meta = select_entries(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 6, dtype=torch.long), index, dim=1)
    assert meta.tolist() == [[0, 1, 1], [1, 0, 0]]


def test_plan_is_split_by_reader_and_the_update_is_typed():
    steps, _ = run(BeaconConfig(window=16, ratios=[4], sink_size=1), [40])
    plans = [p for p, _, _ in steps]
    assert plans[0].mask.valid is plans[0].inputs.valid  # one tensor, two readers
    completing = [p for p in plans if p.update.comp_new is not None]
    assert len(completing) == 2 and all(p.inputs.comp_positions is not None for p in completing)
    assert all(p.inputs.comp_positions is None for p in plans if p.update.comp_new is None)
    for p in plans:
        for how in (p.update.sink, p.update.raw, p.update.comp):
            assert isinstance(how, (Take, torch.Tensor))


@pytest.mark.parametrize("placement", ["interleave", "append"])
@pytest.mark.parametrize("scope", ["full-coverage", "step-expansion", "segmentation"])
def test_config_predicates_name_the_settings(placement, scope):
    config = BeaconConfig(window=16, ratios=[4], placement=placement, attention_scope=scope)
    assert config.interleaved == (placement == "interleave")
    assert config.scoped == (scope != "full-coverage")
    assert config.segmented == (scope == "segmentation")
    assert config.masks_first_window() == (placement != "interleave" or scope != "full-coverage")
