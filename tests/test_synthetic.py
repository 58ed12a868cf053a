"""The synthetic retrieval/QA data of the fine-tuning stage (`beacon_peft.training.synthetic`, `offline:retrieval`)
on the real SmolLM2 tokenizer and the offline texts."""

from __future__ import annotations

import re

import pytest

from beacon_peft import BeaconConfig, training
from beacon_peft.offline import corpora
from beacon_peft.training.synthetic import ACCOUNTS, PEOPLE, PLACES, TEMPLATES, plain_text_examples, retrieval_examples


@pytest.fixture(scope="module")
def texts():
    try:
        train, _ = corpora.essay_split()
    except RuntimeError as err:
        pytest.skip(str(err))
    return [t for _, t in train]


def test_examples_hold_their_answer_in_a_needle_and_end_with_the_lead_in(tokenizer, texts):
    examples = retrieval_examples(tokenizer, texts, 60, 300, 600, seed=3)
    assert {e["template"] for e in examples} >= set(range(6))  # many phrasings, not one
    assert max(e["n_needles"] for e in examples) >= 3
    for e in examples:
        needle, question, lead = TEMPLATES[e["template"]]
        value = e["completion"].strip().rstrip(".")
        assert e["completion"] == f" {value}."
        # the lead-in ends the prompt and names a subject whose needle, with this value, is in the haystack
        subjects = [""] if "{s}" not in lead else PEOPLE + PLACES + ACCOUNTS
        hits = [x for x in subjects if e["prompt"].endswith(" " + lead.format(s=x))
                and needle.format(s=x, v=value) in e["prompt"]]
        assert len(hits) == 1, (e["prompt"][-200:], e["completion"])
        n = len(tokenizer(e["prompt"] + e["completion"])["input_ids"])
        assert 300 - 8 <= n <= 600, n
        assert 0.0 <= e["depth"] <= 1.0


def test_depth_is_the_queried_needles_position(tokenizer, texts):
    """``depth`` places the needle the question asks about (not a distractor): about one example in four has it in
    the last sixth of the haystack, the rest earlier."""
    examples = retrieval_examples(tokenizer, texts, 80, 1500, 2000, seed=7)
    assert sum(e["n_needles"] > 1 for e in examples) >= 20
    for e in examples:
        needle, _, lead = TEMPLATES[e["template"]]
        value = e["completion"].strip().rstrip(".")
        subjects = [""] if "{s}" not in lead else PEOPLE + PLACES + ACCOUNTS
        subject = next(x for x in subjects if e["prompt"].endswith(" " + lead.format(s=x)))
        at = e["prompt"].index(needle.format(s=subject, v=value)) / len(e["prompt"])
        assert abs(at - e["depth"]) < 0.1, (at, e["depth"], e["n_needles"])
    late = sum(e["depth"] > 5 / 6 for e in examples)
    assert 8 <= late <= 32, late


def test_needle_token_end_is_where_the_queried_needle_ends_in_the_prompt_ids(tokenizer, texts):
    """``needle_token_end`` indexes ``prompt_ids``: the queried needle's own tokens (value included) end exactly
    there."""
    examples = retrieval_examples(tokenizer, texts, 40, 600, 900, seed=11, as_ids=True)
    assert sum(e["n_needles"] > 1 for e in examples) >= 10  # distractors around the queried needle
    for e in examples:
        needle, _, lead = TEMPLATES[e["template"]]
        value = e["completion"].strip().rstrip(".")
        subjects = [""] if "{s}" not in lead else PEOPLE + PLACES + ACCOUNTS
        prompt = tokenizer.decode(e["prompt_ids"])
        subject = next(x for x in subjects if prompt.endswith(" " + lead.format(s=x)))
        text = needle.format(s=subject, v=value)
        end = e["needle_token_end"]
        assert 0 < end < len(e["prompt_ids"])
        own = tokenizer.encode(" " + text + " ", add_special_tokens=False)  # a needle as the haystack holds it
        assert e["prompt_ids"][end - len(own) : end] == own, (text, end)


def test_same_seed_same_examples_other_seed_other_examples(tokenizer, texts):
    a = retrieval_examples(tokenizer, texts, 5, 200, 400, seed=1)
    assert a == retrieval_examples(tokenizer, texts, 5, 200, 400, seed=1)
    assert a != retrieval_examples(tokenizer, texts, 5, 200, 400, seed=2)


def test_distractor_needles_carry_other_values(tokenizer, texts):
    many = [e for e in retrieval_examples(tokenizer, texts, 80, 300, 500, seed=5) if e["n_needles"] > 1]
    assert many
    for e in many:
        needle = TEMPLATES[e["template"]][0]
        if "{s}" not in needle:
            continue
        head, _ = needle.split("{v}")
        pattern = re.escape(head).replace(re.escape("{s}"), r"([A-Za-z]+)") + r"([A-Za-z0-9\- ]+?)\."
        found = re.findall(pattern, e["prompt"])
        values = [v for _, v in found]
        assert len(set(values)) == len(values) >= 2  # distinct values: the question has one right answer


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0, min_tokens=100, max_tokens=200), "n=0"),
    (dict(n=1, min_tokens=10, max_tokens=200), "min_tokens=10"),
    (dict(n=1, min_tokens=300, max_tokens=200), "min_tokens=300"),
    (dict(n=1, min_tokens=100, max_tokens=200, max_needles=0), "max_needles=0"),
])
def test_bad_arguments_raise(tokenizer, texts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        retrieval_examples(tokenizer, texts, **kwargs)


def test_offline_retrieval_dataset_never_reads_held_out_essays_and_labels_only_the_answer(tokenizer, tmp_path):
    _, held_out = corpora.essay_split()
    argv = ["--model_name_or_path", "m", "--dataset_name", "offline:retrieval", "--stage", "finetune",
            "--chat_template", "false", "--retrieval_examples", "120", "--max_length", "768", "--min_length", "600",
            "--window", "512", "--ratios", "8", "--output_dir", str(tmp_path)]
    script_args, _, training_args, _ = training.parse_args(argv)
    docs = training.load_documents(script_args, "text", tokenizer, training_args.max_length, seed=0)
    assert len(docs) == 120 and set(docs.column_names) == {"prompt", "completion"}
    probes = [re.sub(r"\s+", " ", text[len(text) // 2 : len(text) // 2 + 80]) for _, text in held_out]
    for prompt in docs["prompt"]:
        flat = re.sub(r"\s+", " ", prompt)
        assert not any(p in flat for p in probes)
    ds = training.tokenize_dataset(docs, tokenizer, script_args, training_args, BeaconConfig(window=512, ratios=[8]))
    assert len(ds) >= 110  # a few may re-tokenize past max_length and are dropped
    for example in ds.select(range(20)):
        labelled = [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != -100]
        assert labelled[-1] == tokenizer.eos_token_id
        answer = tokenizer.decode(labelled[:-1])
        assert re.fullmatch(r" [A-Za-z0-9][A-Za-z0-9\- ]*\.", answer), answer
        prompt = tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab == -100])
        assert "<|im_start|>" not in prompt  # raw text, no chat template

    script_args.stage = "pretrain"
    with pytest.raises(ValueError, match="use --stage finetune"):
        training.load_documents(script_args, "text", tokenizer, 768)
    script_args.stage = "finetune"
    with pytest.raises(ValueError, match="needs the tokenizer and --max_length"):
        training.load_documents(script_args, "text")


def test_ask_all_asks_about_every_needle_and_labels_each_answer(tokenizer, texts):
    """``ask_all``: the completion answers the first question, then asks about each other needle (distractors
    included) once, every answer being that needle's value in the prompt."""
    examples = retrieval_examples(tokenizer, texts, 60, 600, 1000, seed=11, ask_all=True)
    assert max(e["n_questions"] for e in examples) >= 3
    for e in examples:
        assert e["n_questions"] == e["n_needles"]
        parts = e["completion"].split("\n\n")
        assert len(parts) == e["n_questions"]
        asked = [e["prompt"].rsplit("\n\n", 1)[1] + parts[0]] + parts[1:]
        leads = set()
        for qa in asked:
            matches = [(t, x) for t in TEMPLATES for x in (PEOPLE + PLACES + ACCOUNTS if "{s}" in t[0] else ("",))
                       if qa.startswith(f"{t[1].format(s=x)} {t[2].format(s=x)} ") and qa.endswith(".")]
            assert len(matches) == 1, qa
            (needle, question, lead), subject = matches[0]
            value = qa[len(f"{question.format(s=subject)} {lead.format(s=subject)} ") : -1]
            assert needle.format(s=subject, v=value) in e["prompt"], (qa, e["prompt"][-300:])
            leads.add(lead.format(s=subject))
        assert len(leads) == len(asked)  # each needle asked once
        n = len(tokenizer(e["prompt"] + e["completion"])["input_ids"])
        assert n <= 1000, n


def test_plain_text_rows_have_no_prompt_and_exact_lengths(tokenizer, texts):
    rows = plain_text_examples(tokenizer, texts, 6, 200, 400, seed=4)
    assert rows == plain_text_examples(tokenizer, texts, 6, 200, 400, seed=4)
    for r in rows:
        assert r["prompt"] == ""
        assert 200 - 8 <= len(tokenizer(r["completion"])["input_ids"]) <= 400 + 8  # re-tokenization at the ends
    with pytest.raises(ValueError, match="min_tokens=500"):
        plain_text_examples(tokenizer, texts, 1, 500, 400)
    with pytest.raises(ValueError, match="n=0"):
        plain_text_examples(tokenizer, texts, 0, 200, 400)


def test_retrieval_stage_mixes_plain_text_rows_labelled_on_every_token(tokenizer, tmp_path):
    argv = ["--model_name_or_path", "m", "--dataset_name", "offline:retrieval", "--stage", "finetune",
            "--chat_template", "false", "--retrieval_examples", "60", "--retrieval_text_fraction", "0.25",
            "--retrieval_ask_all", "true", "--max_length", "768", "--min_length", "600",
            "--window", "512", "--ratios", "8", "--output_dir", str(tmp_path)]
    script_args, _, training_args, _ = training.parse_args(argv)
    docs = training.load_documents(script_args, "text", tokenizer, training_args.max_length, seed=0)
    assert len(docs) == 80 and sum(p == "" for p in docs["prompt"]) == 20  # 60 retrieval + 20 text (1 in 4)
    at = [i for i, p in enumerate(docs["prompt"]) if p == ""]
    assert at[0] < 4 and all(b - a == 4 for a, b in zip(at, at[1:]))  # every 4th row, not appended
    ds = training.tokenize_dataset(docs, tokenizer, script_args, training_args, BeaconConfig(window=512, ratios=[8]))
    fully_labelled = [e for e in ds if all(label != -100 for label in e["labels"])]
    answer_only = [e for e in ds if sum(label != -100 for label in e["labels"]) < 200]
    assert len(fully_labelled) >= 15 and len(answer_only) >= 50 and len(fully_labelled) + len(answer_only) == len(ds)

    for bad in ("1.0", "-0.1"):
        with pytest.raises(ValueError, match=f"retrieval_text_fraction={float(bad)}"):
            training.parse_args(argv[:10] + ["--retrieval_text_fraction", bad] + argv[12:])
