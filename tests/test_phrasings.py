"""Composed needle phrasings (beacon_peft.training.phrasings) and the read-back rows and probe built from them."""

from __future__ import annotations

import json
import random
import string

import pytest

from beacon_peft.labels import IGNORE_INDEX
from beacon_peft.training import phrasings
from beacon_peft.training.phrasings import (
    ATTRIBUTES,
    HOLDERS,
    QUESTIONS,
    SPLITS,
    STATEMENTS,
    as_passkey_template,
    compose_fact,
    compose_facts,
    split_items,
)
from beacon_peft.training.readback.rows import MixedRows
from tests.test_readback import DOCS, _tiny_run_args


@pytest.mark.parametrize("items", [HOLDERS, ATTRIBUTES, STATEMENTS, QUESTIONS], ids=["holders", "attributes",
                                                                                     "statements", "questions"])
def test_the_splits_are_disjoint_and_cover_every_part(items):
    train, held = split_items(items, "train"), split_items(items, "held_out")
    assert train and held and len(held) >= len(items) // 4
    assert not set(train) & set(held) and sorted(map(str, train + held)) == sorted(map(str, items))
    with pytest.raises(ValueError, match="split='test'"):
        split_items(items, "test")


def _fields(pattern: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(pattern) if f}


def test_every_statement_states_the_value_after_some_words_and_every_question_names_holder_and_attribute():
    for s in STATEMENTS:
        assert "v" in _fields(s) and not s.startswith("{v}")
    for question, lead in QUESTIONS:
        fields = _fields(question)
        assert fields & {"h", "hs", "H", "Hs"} and "a" in fields and "v" not in fields | _fields(lead)


def _rendered(patterns, fact):
    parts = dict(H=fact.holder[:1].upper() + fact.holder[1:], h=fact.holder, a=fact.attribute,
                 hs=phrasings._possessive(fact.holder))
    parts["Hs"] = parts["hs"][:1].upper() + parts["hs"][1:]
    return {p.format(v=fact.value, **parts) for p in patterns}


@pytest.mark.parametrize("split", SPLITS)
def test_a_composed_fact_uses_only_its_splits_parts_and_splits_at_its_value(split):
    rng = random.Random(3)
    for _ in range(200):
        fact = compose_fact(rng, split)
        assert fact.holder in split_items(HOLDERS, split) and fact.attribute in split_items(ATTRIBUTES, split)
        assert fact.needle in _rendered(split_items(STATEMENTS, split), fact)
        assert fact.question in _rendered([q for q, _ in split_items(QUESTIONS, split)], fact)
        assert fact.needle == fact.cue + " " + fact.rest and fact.rest.startswith(fact.value)
        assert fact.value in fact.needle and fact.value not in fact.question + fact.lead
        assert "{" not in fact.needle + fact.question + fact.lead
        assert fact.value.isdigit() and 3 <= len(fact.value) <= 8 or fact.value[2] == "-"


def test_composed_facts_have_distinct_holders_and_values_and_bad_counts_are_refused():
    for seed in range(30):
        facts = compose_facts(random.Random(seed), 6)
        assert len({f.holder for f in facts}) == 6 and len({f.value for f in facts}) == 6
    limit = len(split_items(HOLDERS, "held_out"))
    for bad in (0, limit + 1, 2.0):
        with pytest.raises(ValueError, match=f"n={bad!r}: allowed an int in \\[1, {limit}\\]"):
            compose_facts(random.Random(0), bad, "held_out")


def test_a_composed_fact_becomes_a_pass_key_case(tokenizer):
    from beacon_peft.needles import make_passkey_case

    hay = tokenizer.encode(DOCS[0] + DOCS[1], add_special_tokens=False)
    for seed in range(5):
        fact = compose_fact(random.Random(seed), "held_out")
        needle, question = as_passkey_template(fact)
        case = make_passkey_case(hay, tokenizer, 600, 0.4, seed, needle=needle, question=question, intro="")
        stated = tokenizer.decode(case["context_ids"][case["needle_token_start"] : case["needle_token_end"]])
        assert stated.strip() == fact.needle.replace(fact.value, case["answer"])
        assert tokenizer.decode(case["question_ids"]).strip().startswith(fact.question)


def test_composed_rows_ask_every_fact_and_score_only_the_values(tokenizer):
    rows = MixedRows(tokenizer, DOCS, 200, 320, seed=2, text_fraction=0.0, composed_fraction=1.0, block=8)
    train_holders = split_items(HOLDERS, "train")
    for r in next(iter(rows.blocks())):
        ids, text, answer = r["input_ids"], r["text_labels"], r["answer_labels"]
        assert len(ids) == len(text) == len(answer) <= 320
        scored = [i for i, a in enumerate(answer) if a != IGNORE_INDEX]
        prose = [i for i, t in enumerate(text) if t != IGNORE_INDEX]
        assert prose == list(range(len(prose))) and scored and scored[0] > prose[-1] + 1  # a question between
        assert all(answer[i] == ids[i] for i in scored)
        values = tokenizer.decode([ids[i] for i in scored]).split(".")
        values = [v.strip() for v in values if v.strip()]
        haystack = tokenizer.decode(ids[: len(prose)])
        assert values and all(v in haystack for v in values), (values, haystack[-300:])
        asked = tokenizer.decode(ids[len(prose) :])
        assert any(h in asked for h in train_holders)  # every question names a training-split holder
        assert not any(h in haystack + asked for h in split_items(HOLDERS, "held_out") if h.istitle())
    # the default mix draws no composed rows and no composed needles (earlier configs' rows are unchanged)
    assert MixedRows(tokenizer, DOCS, 200, 320).composed_fraction == 0.0
    with pytest.raises(ValueError, match="composed_fraction=0.6 must be in \\[0, 1 - text_fraction - "
                                         "recall_fraction = 0.5\\]"):
        MixedRows(tokenizer, DOCS, 200, 320, text_fraction=0.5, composed_fraction=0.6)
    with pytest.raises(ValueError, match="max_needles=9 must be in \\[1, 8\\]"):
        MixedRows(tokenizer, DOCS, 200, 320, max_needles=9)


def test_recall_rows_mix_composed_needles_in_when_composed_rows_are_on(tokenizer):
    rows = MixedRows(tokenizer, DOCS, 200, 320, seed=4, text_fraction=0.0, recall_fraction=1.0, window=64,
                     composed_fraction=0.0)
    mixed = MixedRows(tokenizer, DOCS, 200, 320, seed=4, text_fraction=0.0, recall_fraction=0.9, window=64,
                      composed_fraction=0.1)
    attributes = split_items(ATTRIBUTES, "train")

    def count(stream):
        text = " ".join(tokenizer.decode(r["input_ids"]) for r in next(iter(stream.blocks())))
        return sum(text.count(a) for a in attributes)

    assert count(rows) == 0 < count(mixed)


def test_the_training_curve_probes_unseen_phrasings_when_composed_rows_are_on(tmp_path, tokenizer):
    from beacon_peft.training.readback.probes import make_probe
    from recipes.train_readback import main

    hay = tokenizer.encode((DOCS[0] + DOCS[1]) * 3, add_special_tokens=False)
    seen, unseen = make_probe(tokenizer, hay, 3, 512), make_probe(tokenizer, hay, 3, 512, unseen=True)
    assert len(unseen) == 3 and [c["length"] for c in unseen] == [c["length"] for c in seen]
    text = tokenizer.decode(unseen[0]["own"])
    assert "pass key" not in text and any(h in text for h in split_items(HOLDERS, "held_out"))
    args = [a for a in _tiny_run_args(tmp_path, tokenizer)]
    main(args + ["--max_steps", "1", "--composed_fraction", "0.5", "--text_fraction", "0.2"])
    curve = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert [c["step"] for c in curve] == [0, 1] and all("key_information_unseen" in c for c in curve)


def test_the_curve_table_shows_the_unseen_phrasings_column_when_the_run_probed_them(tmp_path):
    from recipes.plot_readback import main as plot_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "curve.json").write_text(json.dumps([
        dict(step=0, tokens=0, key_information=1.9, context_gain=0.9, key_information_unseen=1.1),
        dict(step=50, tokens=6000, key_information=2.0, context_gain=0.95, key_information_unseen=1.6)]))
    (run / "train_log.jsonl").write_text(json.dumps(dict(step=50, tokens=6000, text=3.1, answer=1.2, kl=0.2)) + "\n")
    assert plot_main([str(run), "--out", str(tmp_path / "out"), "--name", "u"]) == 0
    table = (tmp_path / "out" / "u_curve.md").read_text().splitlines()
    assert table[0].startswith("| step | tokens | key information (nats, ratio 8) | unseen phrasings (nats, ratio 8) | "
                               "context gain")
    assert table[3] == "| 50 | 6,000 | 2.000 | 1.600 | 0.950 | 3.10 | 1.20 | 0.20 |"
