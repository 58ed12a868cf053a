"""The model card's record of a run (`beacon_peft.training.card.TrainingRecord`) and the earlier-stage section."""

from __future__ import annotations

import json
from pathlib import Path

from beacon_peft.training.card import TrainingRecord, earlier_stage

SHIPPED = Path(__file__).resolve().parents[2] / "adapters" / "smollm2-135m-beacon-v1"  # v1: a train.py run


def test_a_record_round_trips_through_training_log_json(tmp_path):
    record = TrainingRecord(optimizer_steps=24, epochs=2.0, tokens_seen=6144, wall_time_s=12.5, final_loss=3.25,
                            train_loss=3.5)
    (tmp_path / "training_log.json").write_text(json.dumps({"record": record.to_json(), "log_history": []}))
    assert TrainingRecord.read(tmp_path) == record
    assert TrainingRecord.read(tmp_path / "missing") is None


def test_a_log_without_a_record_is_read_from_trainers_history():
    """The first shipped adapter's (v1's) log predates records: its figures come from the log history (as its card
    shows)."""
    record = TrainingRecord.read(SHIPPED)
    card = (SHIPPED / "README.md").read_text()
    assert f"| tokens seen (non-padding) | {record.tokens_seen:,} |" in card
    assert f"| optimizer steps | {record.optimizer_steps} " in card
    assert f"| final logged training loss | {record.final_loss:.4f} |" in card
    assert f"| mean training loss | {record.train_loss:.4f} |" in card
    assert abs(record.wall_time_s - 2113.4) < 1  # Trainer's train_runtime; the card shows the measured wall time


def test_earlier_stage_totals_come_from_the_records(tmp_path):
    earlier = TrainingRecord(optimizer_steps=10, epochs=1.0, tokens_seen=1000, wall_time_s=20.0, final_loss=None,
                             train_loss=None)
    (tmp_path / "training_log.json").write_text(json.dumps({"record": earlier.to_json()}))
    (tmp_path / "README.md").write_text("# card\n\n## Data\n\n- x\n\n## Training\n\n| figure | value |\n")
    now = TrainingRecord(optimizer_steps=5, epochs=1.0, tokens_seen=234, wall_time_s=2.5, final_loss=1.0,
                         train_loss=1.0)
    lines = earlier_stage(str(tmp_path), now)
    assert lines[:3] == ["## Earlier stage", "", f"This run started from the beacon weights of `{tmp_path}`."]
    assert "Both stages together: 1,234 tokens seen, 22.5 s of train() wall time." in lines
    assert "### Data" in lines and "### Training" in lines and "# card" not in lines
    assert earlier_stage(None, now) == []
    (tmp_path / "README.md").unlink()
    assert earlier_stage(str(tmp_path), now)[-2:] == ["(That folder has no model card.)", ""]
