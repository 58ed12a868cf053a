"""Model-level behaviour of the other official modes on the reference checkpoint (tests/fixtures/reference/MODES.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import converted, inputs, load_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return converted(tmp_path_factory.mktemp("reference-modes"))


def _model(folders, **overrides):
    base_dir, adapters = folders
    return load_model(base_dir, adapters["r2_s0"], **overrides)


@pytest.mark.parametrize("scope", ["full-coverage", "step-expansion"])
def test_append_training_masks_first_window_and_keeps_raw_logits(folders, scope):
    model = _model(folders, ratios=[4], placement="append", attention_scope=scope)
    ids = inputs()["seq200"]
    with torch.no_grad():
        model.eval()
        ev = model(input_ids=ids, labels=ids)
        model.train()
        tr = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(ev.logits, tr.logits, atol=0, rtol=0)  # beacons never reach raw tokens' logits here
    token_loss = F.cross_entropy(tr.logits[0, :-1], ids[0, 1:], reduction="none")
    assert abs(tr.loss.item() - token_loss[64:].mean().item()) < 1e-5  # predictions 64..198: 135 tokens
    assert abs(ev.loss.item() - token_loss.mean().item()) < 1e-5


def test_ratio_8_eval_and_train_losses_agree(folders):
    model = _model(folders, ratios=[8], sink_size=1)
    ids = inputs()["seq200"]
    with torch.no_grad():
        ev = model.eval()(input_ids=ids, labels=ids).loss
        tr = model.train()(input_ids=ids, labels=ids).loss
    assert abs(ev.item() - tr.item()) < 1e-6


def test_overlapping_windows_and_segmentation_run(folders):
    for overrides in (dict(placement="append", stride=32, ratios=[4]),
                      dict(placement="append", attention_scope="segmentation", ratios=[4]),
                      dict(attention_scope="segmentation", ratios=[4])):
        model = _model(folders, **overrides)
        ids = inputs()["seq200"]
        out = model.train()(input_ids=ids, labels=ids)
        assert torch.isfinite(out.loss)
        gen = model.eval().generate(input_ids=inputs()["prompt120"], max_new_tokens=12, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        assert gen.shape[1] == 132
