"""The facts module (`beacon_peft.facts`): the `Fact` type, the pass-key fact every part of the project hides, the
shared intros/names/letters, and `needle_compressed` on hand-computed window boundaries.

The pinned strings and token ids are what the demo, the benchmarks and the training data built before the texts
moved into one module: a change to them changes recorded results and training rows, so it must fail here."""

from __future__ import annotations

import hashlib
import random
import string

import pytest

from beacon_peft import facts
from beacon_peft.facts import (
    CODE_LETTERS,
    INTROS,
    NAMED_PASS_KEY,
    NAMES,
    PASS_KEY,
    PASS_KEY_INTRO,
    QUIZ_INTRO,
    SENTENCE_ENDS,
    Fact,
    as_passkey_template,
    check_phrasing,
    named_pass_key_fact,
    needle_compressed,
    pass_key_fact,
    random_number,
)

# ----------------------------------------------------------------------------- texts, exactly as before the move

OLD_PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
OLD_PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
OLD_MULTIKEY_NEEDLE = " The pass key for {name} is {key}. Remember it. {key} is the pass key for {name}. "
OLD_MULTIKEY_QUESTION = "\n\nWhat is the pass key for {name}? The pass key for {name} is"
OLD_QUIZ_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                  "Find it and memorize it. I will quiz you about it.\n\n")
OLD_DEMO_INTRO = "There is a pass key hidden in the text below. Find it and memorize it.\n\n"
OLD_NAMES_16 = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry",
                "Irene", "Jack", "Karen", "Louis", "Maria", "Nathan", "Olivia", "Peter")


def test_the_pass_key_fact_reads_as_the_demo_and_the_benchmarks_wrote_it():
    fact = pass_key_fact("68213")
    assert fact.needle == "The pass key is 68213. Remember it. 68213 is the pass key."
    assert fact.inserted == OLD_PASSKEY_NEEDLE.format(key="68213")
    assert fact.asked == OLD_PASSKEY_QUESTION
    assert (fact.question, fact.lead, fact.value) == ("What is the pass key?", "The pass key is", "68213")
    assert (fact.cue, fact.rest) == ("The pass key is", "68213. Remember it. 68213 is the pass key.")
    assert fact.completion == " 68213."
    named = named_pass_key_fact("Maria", "4071")
    assert named.inserted == OLD_MULTIKEY_NEEDLE.format(name="Maria", key="4071")
    assert named.asked == OLD_MULTIKEY_QUESTION.format(name="Maria") and named.holder == "Maria"


def test_the_benchmarks_demo_and_training_use_the_modules_texts():
    from beacon_peft import needles
    from beacon_peft.offline import demo
    from beacon_peft.training import phrasings, synthetic

    assert (needles.PASSKEY_NEEDLE, needles.PASSKEY_QUESTION) == (OLD_PASSKEY_NEEDLE, OLD_PASSKEY_QUESTION)
    assert (needles.MULTIKEY_NEEDLE, needles.MULTIKEY_QUESTION) == (OLD_MULTIKEY_NEEDLE, OLD_MULTIKEY_QUESTION)
    assert needles.INTRO == QUIZ_INTRO == OLD_QUIZ_INTRO == INTROS[0] and PASS_KEY_INTRO == OLD_DEMO_INTRO
    assert needles.NAMES == OLD_NAMES_16 == NAMES[:16]
    assert needles.needle_compressed is needle_compressed and needles.check_phrasing is check_phrasing
    assert synthetic.TEMPLATES[0] is PASS_KEY and synthetic.PEOPLE is NAMES and synthetic.INTROS is INTROS
    assert phrasings.Fact is Fact and phrasings.as_passkey_template is as_passkey_template
    assert demo.pass_key_fact is pass_key_fact and not hasattr(demo, "NEEDLE")  # no copy of the texts left there


def test_shared_names_letters_and_sentence_ends():
    assert len(NAMES) == len(set(NAMES)) == 24 and NAMES[-1] == "Yuki"
    assert CODE_LETTERS == "ABCDEFGHJKLMNPQRSTUVWXYZ" and not set("IO") & set(CODE_LETTERS)
    assert SENTENCE_ENDS == (".", "!", "?", "\n")
    assert INTROS == (OLD_QUIZ_INTRO, "Read the following text carefully; a question about it follows.\n\n", "")


# ----------------------------------------------------------------------------- the Fact type


def test_a_fact_from_a_template_fills_every_field():
    fact = Fact.from_template("The secret code for {s} is {v}.", "What is the secret code for {s}?",
                              "The secret code for {s} is", "KT-4071", holder="Maria", s="Maria")
    assert fact == Fact(needle="The secret code for Maria is KT-4071.", cue="The secret code for Maria is",
                        rest="KT-4071.", question="What is the secret code for Maria?",
                        lead="The secret code for Maria is", value="KT-4071", holder="Maria", attribute="")
    assert fact.needle == fact.cue + " " + fact.rest
    assert fact.inserted == " The secret code for Maria is KT-4071. "
    assert fact.asked == "\n\nWhat is the secret code for Maria? The secret code for Maria is"
    with pytest.raises(AttributeError):  # frozen: a fact is a value
        fact.value = "1"  # type: ignore[misc]


def test_a_fact_without_a_lead_in_asks_the_bare_question():
    fact = Fact.from_template("{H} picked {v} for the {a}.", "Question: {h}'s {a}? Answer:", "", "907",
                              holder="Gwen", attribute="PIN", H="Gwen", h="Gwen", a="PIN")
    assert fact.needle == "Gwen picked 907 for the PIN." and fact.cue == "Gwen picked"
    assert fact.rest == "907 for the PIN." and fact.asked == "\n\nQuestion: Gwen's PIN? Answer:"
    assert as_passkey_template(fact) == (" Gwen picked {key} for the PIN. ", fact.asked)


def test_as_passkey_template_escapes_braces_and_passes_check_phrasing():
    fact = Fact(needle="Code {x}: 4071.", cue="Code {x}:", rest="4071.", question="Code?", lead="", value="4071")
    needle, question = as_passkey_template(fact)
    assert needle == " Code {{x}}: {key}. " and needle.format(key="5") == " Code {x}: 5. "
    check_phrasing(needle, question)
    for bad in ("no key", "{key} and {other}", "{key"):
        with pytest.raises(ValueError):
            check_phrasing(bad, "q?")
    with pytest.raises(ValueError):
        check_phrasing("{key}", "  ")
    with pytest.raises(TypeError):
        check_phrasing(None, "q?")  # type: ignore[arg-type]


def test_random_number_is_one_randint_of_exactly_that_many_digits():
    for seed in range(20):
        rng, ref = random.Random(seed), random.Random(seed)
        key = random_number(rng, 5)
        assert key == str(ref.randint(10000, 99999)) and len(key) == 5 and rng.random() == ref.random()
    assert [random_number(random.Random(s), 5) for s in (0, 1, 7)] == ["60494", "27611", "52445"]
    assert all(len(random_number(random.Random(s), d)) == d for s in range(5) for d in range(1, 9))


# ----------------------------------------------------------------------------- needle_compressed


@pytest.mark.parametrize("end, n_prompt, window, stride, compressed", [
    # no overlap: the answer is read at n_prompt - 1; the windows before the one holding it are compressed
    (128, 129, 64, 64, True),  # read at 128: windows [0, 64) and [64, 128) done
    (129, 129, 64, 64, False),
    (64, 128, 64, 64, True),  # read at 127: window [64, 128) still open
    (65, 128, 64, 64, False),
    (1, 64, 64, 64, False),  # read in the first window: nothing compressed yet
    (0, 64, 64, 64, True),
    (1024, 1025, 512, 512, True),
    (1024, 1024, 512, 512, False),
    (512, 1024, 512, 512, True),
    # overlap (stride < window): the last window - stride raw activations of a completed window stay raw
    (80, 129, 64, 48, True),  # read at 128, in the window from 96; 96 - 16 = 80
    (81, 129, 64, 48, False),
    (128, 513, 512, 256, True),  # read at 512, in the window from 512; 512 - 256 = 256 compressed
    (256, 512, 512, 256, False),  # read at 511, in the window from 256; nothing compressed yet
    (0, 512, 512, 256, True),
    (256, 513, 512, 256, True),
    (257, 513, 512, 256, False),
])
def test_needle_compressed_on_hand_computed_boundaries(end, n_prompt, window, stride, compressed):
    assert needle_compressed(end, n_prompt, window, stride) is compressed
    assert needle_compressed({"needle_token_end": end}, n_prompt, window, stride) is compressed  # a case dict


def test_needle_compressed_is_the_read_back_probes_old_inline_check():
    """The read-back probe (before `facts.needle_compressed`) skipped a pair when
    ``end > window * ((n_prompt - 1) // window)``."""
    for window in (16, 64, 512):
        for n_prompt in range(1, 4 * window):
            for end in range(0, n_prompt + 1, 7):
                old = not end > window * ((n_prompt - 1) // window)
                assert needle_compressed(end, n_prompt, window, window) is old


# ----------------------------------------------------------------------------- pinned token ids (SmolLM2)


@pytest.fixture(scope="module")
def held_out(tokenizer):
    from beacon_peft.offline.corpora import haystack_ids

    try:
        return haystack_ids(tokenizer, 40000, "held_out")
    except RuntimeError as err:
        pytest.skip(str(err))


def _digest(ids) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


QUESTION_IDS = [198, 198, 1780, 314, 260, 1301, 1646, 47, 378, 1301, 1646, 314]  # "\n\nWhat is the pass key? ..."


def test_the_demos_prompt_is_pinned(tokenizer, held_out):
    from beacon_peft.offline.demo import build_parts, build_prompt

    document, question, key = build_parts(tokenizer, 600, 0.5, 0)
    assert key == "60494" and question == QUESTION_IDS and len(document) == 588
    assert document[:18] == tokenizer.encode(OLD_DEMO_INTRO, add_special_tokens=False) == [
        2122, 314, 253, 1301, 1646, 5631, 281, 260, 1694, 2441, 30, 7985, 357, 284, 30082, 357, 30, 1116]
    needle = tokenizer.encode(OLD_PASSKEY_NEEDLE.format(key="60494"), add_special_tokens=False)
    assert needle == [378, 1301, 1646, 314, 216, 38, 32, 36, 41, 36, 30, 5258, 357, 30, 216, 38, 32, 36, 41, 36,
                      314, 260, 1301, 1646, 30, 216]
    at = next(i for i in range(len(document)) if document[i : i + len(needle)] == needle)
    assert at == 18 + (588 - 18 - len(needle)) // 2  # the needle at depth 0.5 of the filler
    assert _digest(document + question) == "511f3789989f1c6e"
    assert build_prompt(tokenizer, 600, 0.5, 0) == (document + question, key)


def test_the_benchmarks_cases_are_pinned(tokenizer, held_out):
    from beacon_peft.needles import make_multikey_case, make_passkey_case

    case = make_passkey_case(held_out, tokenizer, 1000, 0.4, 3)
    assert (case["answer"], case["needle_token_start"], case["needle_token_end"]) == ("41190", 412, 438)
    assert case["question_ids"] == QUESTION_IDS and _digest(case["context_ids"]) == "49ef258dc6a8d9f9"
    multi = make_multikey_case(held_out, tokenizer, 1200, 5)
    assert multi["names"] == ["Irene", "Louis", "Frank", "Maria"] and multi["query_index"] == 1
    assert multi["keys"] == ["95463", "79473", "13801", "71030"]
    assert multi["needle_token_starts"] == [164, 459, 752, 1032]
    assert multi["question_ids"] == [198, 198, 1780, 314, 260, 1301, 1646, 327, 6912, 47, 378, 1301, 1646, 327,
                                     6912, 314]


def test_the_training_facts_are_pinned():
    from beacon_peft.training import phrasings, synthetic

    rng = random.Random(4)
    assert [synthetic.draw_fact(rng) for _ in range(3)] == [
        ("The pass key for Jack is", "838. Remember it."), ("Peter keeps the spare key in the", "blue vase."),
        ("The special magic number is", "120.")]
    fact = phrasings.compose_fact(random.Random(4), "held_out")
    assert fact == Fact(needle="The invoice number that my landlord gave me is 2476.",
                        cue="The invoice number that my landlord gave me is", rest="2476.",
                        question="Can you recall my landlord's invoice number?",
                        lead="Sure, my landlord's invoice number is", value="2476", holder="my landlord",
                        attribute="invoice number")
    assert as_passkey_template(fact) == (" The invoice number that my landlord gave me is {key}. ",
                                         "\n\nCan you recall my landlord's invoice number? Sure, my landlord's "
                                         "invoice number is")


def test_the_module_names_no_benchmark_code():
    """Library code never imports ``benchmarks``: the dependency runs the other way."""
    source = open(facts.__file__).read()
    assert "import benchmarks" not in source and "from benchmarks" not in source
    assert {f for _, f, _, _ in string.Formatter().parse(PASS_KEY[0]) if f} == {"v"}
    assert {f for t in NAMED_PASS_KEY for _, f, _, _ in string.Formatter().parse(t) if f} == {"s", "v"}
