"""The held-out retrieval evaluation's facts (beacon_peft.eval_facts): the split, its enforcement in every training
generator, and the scoring of answers (benchmarks/retrieval/heldout.py)."""

from __future__ import annotations

import random

import pytest

from beacon_peft import eval_facts
from beacon_peft.eval_facts import (
    KINDS,
    QUESTIONS,
    STATEMENTS,
    check_training_fact,
    eval_fact,
    extract_answer,
    held_out_match,
    split_items,
    template_fragments,
    template_leak,
    units_in_place,
)
from beacon_peft.facts import Fact
from beacon_peft.needles import make_fact_case
from beacon_peft.training import phrasings, synthetic
from beacon_peft.training.readback.rows import MixedRows
from benchmarks.retrieval import heldout
from tests.test_readback import DOCS


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_at_least_eight_phrasings_and_a_disjoint_held_out_part(kind):
    for items in (STATEMENTS[kind], QUESTIONS[kind]):
        train, held = split_items(items, "train"), split_items(items, "held_out")
        assert len(items) >= 8 and len(held) == 3 and len(train) == len(items) - 3
        assert not set(train) & set(held) and len(set(items)) == len(items)
    with pytest.raises(ValueError, match="split='test'"):
        split_items(STATEMENTS[kind], "test")
    with pytest.raises(ValueError, match="kind='colour'"):
        eval_fact(random.Random(0), "colour")


def test_no_training_phrasing_holds_a_held_out_one():
    """Fails when any template a training row can hold (synthetic, composed, pass key, this module's training part)
    matches a held-out statement or question: the test that keeps the held-out part unseen."""
    clashes = {t: held_out_match(t) for t in phrasings.training_phrasings() if held_out_match(t)}
    assert not clashes
    # and the check is not vacuous: every held-out phrasing, filled in, is found
    for kind in KINDS:
        for template in [*split_items(STATEMENTS[kind], "held_out"),
                         *(q for q, _ in split_items(QUESTIONS[kind], "held_out"))]:
            filled = template.format(t="the roof hatch", T="The roof hatch", v="4817")
            assert held_out_match("Some prose. " + filled + " More prose.") == template


def test_training_generators_refuse_a_held_out_phrasing(monkeypatch):
    held = split_items(STATEMENTS["number"], "held_out")[0].replace("{t}", "{hs} {a}").replace("{T}", "{Hs}")
    monkeypatch.setattr(phrasings, "STATEMENTS", (held,) * 8)  # every statement of the train split is held out
    with pytest.raises(ValueError, match="held-out phrasing"):
        phrasings.compose_fact(random.Random(0))
    monkeypatch.undo()
    question = split_items(QUESTIONS["date"], "held_out")[1][0].replace("{t}", "{s}")
    monkeypatch.setattr(synthetic, "TEMPLATES", (("{s} said {v}.", question, "It was"),))
    with pytest.raises(ValueError, match="held-out phrasing"):
        synthetic.template_fact(0, "Maria", "4817")
    assert check_training_fact(eval_fact(random.Random(1), "code", "train")).attribute == "code"
    with pytest.raises(ValueError, match="held-out phrasing"):
        check_training_fact(eval_fact(random.Random(1), "code", "held_out"))


def test_training_rows_never_state_or_ask_a_held_out_phrasing(tokenizer):
    """Every kind of read-back row (retrieval with every template, recall, composed), decoded: no held-out phrasing."""
    rows = MixedRows(tokenizer, DOCS, 200, 320, seed=5, text_fraction=0.0, recall_fraction=0.4, window=64,
                     composed_fraction=0.3, templates=list(range(len(synthetic.TEMPLATES))), block=24)
    texts = [tokenizer.decode(r["input_ids"]) for r in next(iter(rows.blocks()))]
    assert len(texts) == 24 and not [t for t in texts if held_out_match(t)]
    for seed in range(200):  # the fact generators themselves, every split of the composed phrasings
        rng = random.Random(seed)
        cue, rest = synthetic.draw_fact(rng)
        assert held_out_match(cue + " " + rest) is None
        for split in phrasings.SPLITS:
            fact = phrasings.compose_fact(rng, split)
            assert held_out_match(fact.needle) is None and held_out_match(fact.question) is None


@pytest.mark.parametrize("kind", KINDS)
def test_a_held_out_fact_is_stated_and_asked_held_out_and_sits_whole_in_its_case(kind, tokenizer):
    fact = eval_fact(random.Random(7), kind)
    assert held_out_match(fact.needle) and held_out_match(fact.question)
    assert fact.value in fact.needle and fact.value not in fact.asked
    hay = tokenizer("The quick brown fox jumps over the lazy dog. " * 60, add_special_tokens=False)["input_ids"]
    case = make_fact_case(hay, tokenizer, 400, 0.5, fact, intro=eval_facts.EVAL_INTRO)
    assert len(case["context_ids"]) == 400 and case["answer"] == fact.value
    stated = tokenizer.decode(case["context_ids"][case["needle_token_start"]:case["needle_token_end"]])
    assert stated.strip() == fact.needle
    assert tokenizer.decode(case["question_ids"]) == fact.asked


@pytest.mark.parametrize("kind,generated,value,extracted", [
    ("number", " 6781. Remember it.", "66817", "6781"),
    ("number", " the digits 3054.", "3054", "3054"),
    ("number", " no number here", "3054", ""),
    ("name", " of Anselm Halvorsen. A: The", "Anselm Halvorsen", "Anselm Halvorsen"),
    ("name", " the head of the lab.", "Anselm Halvorsen", ""),
    ("date", " 5 February 1991.", "5 February 1991", "5 February 1991"),
    ("date", " February 5, 1991.", "5 February 1991", "February 5, 1991"),
    ("code", " QPR-951 in the stock room.", "QPR-951", "QPR-951"),
    ("code", " QPR951.", "QPR-951", "QPR951"),
])
def test_the_first_value_of_the_kind_is_extracted(kind, generated, value, extracted):
    assert extract_answer(generated, kind) == extracted


def test_units_in_place_by_hand():
    assert units_in_place("6781", "66817") == 3  # the example: 6, 8, 1 at places 1, 3, 4
    assert units_in_place("183", "14182") == 1
    assert units_in_place("", "4817") == 0 and units_in_place("4817", "4817") == 4
    assert units_in_place("48170", "4817") == 4  # a longer answer is not exact, but its digits are in place


def test_a_leak_is_training_text_the_case_did_not_contain():
    fragments = template_fragments(["The pass key is {v}. Remember it. {v} is the pass key.", "{Hs} {a} is {v}."])
    assert fragments == ["is the pass key", "remember it", "the pass key is"]  # one-word pieces are no evidence
    assert template_leak(" 4817. Remember it.", "The vault code is 4817.", fragments) == "remember it"
    assert template_leak(" 4817. The vault", "The vault code is 4817.", fragments) is None
    # text the case itself holds is not a leak: the model may repeat its own prompt
    assert template_leak(" 4817, the pass key is", "What is the pass key? The pass key is", fragments) is None
    real = template_fragments(phrasings.training_phrasings(evaluation=False))
    assert "remember it" in real and "the access number for" not in real  # the evaluation's part is no template
    assert "what is the" not in real and "yes, it is" not in real  # function words alone are no evidence


def test_scores_of_one_answer():
    fact = Fact.from_template("The access number for {t} is {v}.", "What is it?", "It is", "66817", t="x")
    case = dict(fact=fact, kind="number")
    fragments = ["remember it"]
    assert heldout.score(" 66817.", case, fragments) == dict(extracted="66817", exact=True, in_place=1.0, leak=None)
    got = heldout.score(" 6781. Remember it, 6781", case, fragments)
    assert got == dict(extracted="6781", exact=False, in_place=0.6, leak="remember it")


def test_the_plan_rotates_kinds_and_corpora_and_is_seeded():
    s = heldout.Settings([2048, 4096], cases=2)
    plan = heldout.case_plan(s, seed=0)
    assert len(plan) == 2 * 5 * 2 and plan == heldout.case_plan(s, seed=0) and plan != heldout.case_plan(s, seed=1)
    for length in s.lengths:
        at = [p for p in plan if p["length"] == length]
        assert {p["kind"] for p in at} == set(KINDS) and {p["corpus"] for p in at} == set(heldout.CORPORA)
    assert all(held_out_match(p["fact"].needle) for p in plan)
    assert not any(held_out_match(p["fact"].needle) for p in heldout.case_plan(heldout.Settings([2048], split="train"),
                                                                               seed=0))


def test_kinds_rows_hold_the_evaluations_training_phrasings_only(tokenizer):
    """``kinds_fraction``: composed and recall rows draw facts of the evaluation's training part (all four kinds
    over a block), never a held-out one; 0 (the default) leaves the rows of earlier configs unchanged."""
    kw = dict(seed=6, text_fraction=0.0, recall_fraction=0.5, window=64, composed_fraction=0.5, block=16)
    rows = MixedRows(tokenizer, DOCS, 200, 320, kinds_fraction=1.0, **kw)
    texts = [tokenizer.decode(r["input_ids"]) for r in next(iter(rows.blocks()))]
    assert not [t for t in texts if held_out_match(t)]
    things = {kind: [t for t in eval_facts.THINGS[kind] if any(t in x for x in texts)] for kind in KINDS}
    assert all(things.values()), things
    base = MixedRows(tokenizer, DOCS, 200, 320, **kw)
    assert next(iter(base.blocks())) == next(iter(MixedRows(tokenizer, DOCS, 200, 320, kinds_fraction=0.0,
                                                            **kw).blocks()))
    assert not any(t in tokenizer.decode(r["input_ids"]) for r in next(iter(base.blocks()))
                   for kind in KINDS for t in eval_facts.THINGS[kind])
    with pytest.raises(ValueError, match="kinds_fraction=1.5 must be in \\[0, 1\\]"):
        MixedRows(tokenizer, DOCS, 200, 320, kinds_fraction=1.5, **kw)
