"""The read-back stage: its loss terms, its row stream, its configs, and a resumable run on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from readback_reference import kl_to_teacher, masked_ce

from beacon_peft.labels import IGNORE_INDEX
from beacon_peft.training.readback import losses as readback
from beacon_peft.training.readback.rows import MixedRows, collate_rows
from beacon_peft.training.synthetic import TEMPLATES, retrieval_examples

ROOT = Path(__file__).resolve().parents[1]
READBACK_CONFIGS = sorted((ROOT / "recipes" / "configs" / "readback").glob("*.yaml"))


def test_kl_to_teacher_is_torch_kl_on_the_masked_positions_and_reaches_the_student_only():
    torch.manual_seed(0)
    student = torch.randn(2, 7, 11, requires_grad=True)
    teacher = torch.randn(2, 7, 11, requires_grad=True)
    mask = torch.rand(2, 7) > 0.4
    total, count = kl_to_teacher(student, teacher, mask, chunk=3)
    s, t = student[mask].log_softmax(-1), teacher[mask].log_softmax(-1)
    expected = F.kl_div(s, t, log_target=True, reduction="sum")
    torch.testing.assert_close(total, expected)
    assert count == mask.sum()
    total.backward()
    assert student.grad is not None and teacher.grad is None
    same, _ = kl_to_teacher(teacher.detach(), teacher.detach(), mask)
    assert abs(float(same)) < 1e-5


def test_hidden_distance_is_the_relative_error_per_layer_on_the_masked_positions():
    torch.manual_seed(0)
    teacher = tuple(torch.randn(2, 5, 4) for _ in range(3))
    student = tuple((t + 0.1 * torch.randn_like(t)).requires_grad_() for t in teacher)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    total, count = readback.hidden_distance(student, teacher, mask)
    expected = sum((((s - t).square().sum(-1) / t.square().sum(-1))[mask]).sum() for s, t in
                   zip(student[1:], teacher[1:])) / 2  # layers 1 and 2; the embeddings are skipped
    torch.testing.assert_close(total, expected)
    assert count.item() == 7
    total.backward()
    assert student[0].grad is None and student[1].grad is not None
    assert student[1].grad[~mask].abs().sum() == 0 and student[1].grad[mask].abs().sum() > 0
    same, _ = readback.hidden_distance(teacher, teacher, mask)
    assert same.item() == 0
    with pytest.raises(ValueError, match="3 hidden-state tensors and teacher 2"):
        readback.hidden_distance(student, teacher[:2], mask)
    with pytest.raises(ValueError, match="differ"):
        readback.hidden_distance(student, (teacher[0], teacher[1], torch.zeros(2, 5, 3)), mask)


def test_kl_to_teacher_refuses_bad_shapes_and_temperatures():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="differ"):
        kl_to_teacher(x, torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature=0"):
        kl_to_teacher(x, x, torch.ones(1, 2, dtype=torch.bool), temperature=0)


def test_masked_ce_is_shifted_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 9)
    labels = torch.randint(0, 9, (2, 6))
    labels[0, 3] = IGNORE_INDEX
    total, count = masked_ce(logits, labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1), reduction="sum",
                               ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(total, expected)
    assert int(count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    empty, none = masked_ce(logits, torch.full_like(labels, IGNORE_INDEX))
    assert float(empty) == 0 and int(none) == 0


def test_head_losses_equal_the_full_logit_losses_in_value_and_gradient():
    torch.manual_seed(2)
    head = torch.nn.Linear(5, 9, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 7, 5, requires_grad=True)
    teacher = torch.randn(2, 7, 5)
    text = torch.randint(0, 9, (2, 7))
    text[1, 4:] = IGNORE_INDEX
    answer = torch.full((2, 7), IGNORE_INDEX)
    answer[0, 5:] = torch.tensor([3, 8])
    mask = torch.rand(2, 7) > 0.3
    got = readback.head_losses(hidden, teacher, head, text, answer, mask, temperature=2.0, chunk=3)
    (got_text, _), (got_answer, _), (got_kl, _) = (got[k] for k in readback.HEAD_TERMS)
    grad = torch.autograd.grad(got_text + 2 * got_answer + got_kl, hidden)[0]

    logits = head(hidden)
    want = [masked_ce(logits, text), masked_ce(logits, answer), kl_to_teacher(logits, head(teacher), mask, 2.0)]
    for name, (w_sum, w_count) in zip(readback.HEAD_TERMS, want):
        torch.testing.assert_close(got[name][0], w_sum)
        assert float(got[name][1]) == float(w_count), name
    want_grad = torch.autograd.grad(want[0][0] + 2 * want[1][0] + want[2][0], hidden)[0]
    torch.testing.assert_close(grad, want_grad)
    assert float(got_answer.detach()) > 0 and float(got_kl.detach()) > 0

    whole = readback.head_losses(hidden, teacher, head, text, answer, mask, temperature=2.0, chunk=None)
    for name in readback.HEAD_TERMS:  # all positions at once, nothing recomputed: the same sums
        torch.testing.assert_close(whole[name][0], got[name][0])
        assert float(whole[name][1]) == float(got[name][1])
    alone = readback.head_losses(hidden, None, head, text, answer, mask)
    assert float(alone["kl"][0]) == 0 and float(alone["kl"][1]) == 0
    torch.testing.assert_close(alone["text"][0], want[0][0])
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match=f"chunk={bad!r}"):
            readback.head_losses(hidden, teacher, head, text, answer, mask, chunk=bad)
    with pytest.raises(ValueError, match="differ"):
        readback.head_losses(hidden, teacher[:, :3], head, text, answer, mask)


def _tiny_beacon(tokenizer=None):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    import beacon_peft

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    beacon = beacon_peft.BeaconConfig(window=16, ratios=[4], sink_size=1, beacon_projections=["q", "k", "v"])
    return get_peft_model(AutoModelForCausalLM.from_config(config), beacon)


def test_training_losses_from_the_decoder_and_head_equal_those_from_the_models_logits():
    """The read-back loop calls the decoder and head_losses instead of the model's logits: same losses, same
    gradients in the adapter, for the compressed student (three windows) and the disabled-adapter teacher."""
    model = _tiny_beacon()
    model.train()
    ids = torch.randint(0, 97, (2, 50))
    attention = torch.ones_like(ids)
    attention[1, :6] = 0
    labels = ids.masked_fill(attention == 0, IGNORE_INDEX)
    answer = torch.full_like(ids, IGNORE_INDEX)
    answer[:, 40:] = ids[:, 40:]
    decoder, head = readback.decoder_and_head(model, ids[:1, :12])
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):
        return torch.autograd.grad(loss, params)

    with torch.no_grad(), model.disable_adapter():
        teacher_logits = model(input_ids=ids, attention_mask=attention).logits
        teacher_hidden = decoder(input_ids=ids, attention_mask=attention).last_hidden_state
    logits = model(input_ids=ids, attention_mask=attention).logits
    old = [masked_ce(logits, labels), masked_ce(logits, answer),
           kl_to_teacher(logits, teacher_logits, attention.bool())]
    old_loss = sum(s / n for s, n in old)
    new = readback.head_losses(decoder(input_ids=ids, attention_mask=attention).last_hidden_state, teacher_hidden,
                               head, labels, answer, attention.bool(), chunk=7)
    new_loss = sum(s / n for s, n in new.values())
    torch.testing.assert_close(new_loss, old_loss)
    assert float(new["kl"][0]) > 0  # the compressed student differs from the teacher
    for g_new, g_old in zip(grads(new_loss), grads(old_loss)):
        torch.testing.assert_close(g_new, g_old)


def test_decoder_and_head_refuses_a_model_whose_logits_are_not_its_head_of_the_last_hidden_state():
    model = _tiny_beacon()
    model.train()
    lm = model.get_base_model()
    handle = lm.register_forward_hook(lambda module, args, out: out.__setitem__("logits", out.logits * 2) or out)
    with pytest.raises(ValueError, match="not its output head applied to the decoder's last hidden state"):
        readback.decoder_and_head(model, torch.randint(0, 97, (1, 8)))
    assert model.training  # restored after the check
    handle.remove()
    decoder, head = readback.decoder_and_head(model, torch.randint(0, 97, (1, 8)))
    assert head is lm.get_output_embeddings() and decoder is lm.get_decoder()


DOCS = ["The harbour was quiet that morning. Boats rocked on the grey water. " * 40,
        "Notes on compilers.\nA parser reads tokens. A lexer makes them. Then code is generated! " * 40]


def test_retrieval_rows_use_only_the_given_templates(tokenizer):
    rows = retrieval_examples(tokenizer, DOCS, 12, 200, 300, seed=3, templates=[1, 4], as_ids=True)
    assert {r["template"] for r in rows} <= {1, 4}
    assert all(r["prompt"] == "" and r["prompt_ids"] and r["completion_ids"] for r in rows)
    for bad in ([], [len(TEMPLATES)], [-1]):
        with pytest.raises(ValueError, match="templates="):
            retrieval_examples(tokenizer, DOCS, 1, 200, 300, templates=bad)


def test_mixed_rows_are_seeded_and_label_prose_and_answers_apart(tokenizer):
    def take(seed, n=12):
        it = iter(MixedRows(tokenizer, DOCS, 150, 300, seed=seed, text_fraction=0.5, block=6))
        return [next(it) for _ in range(n)]

    rows = take(0)
    assert rows == take(0) and rows != take(1)
    kinds = set()
    for r in rows:
        ids, text, answer = r["input_ids"], r["text_labels"], r["answer_labels"]
        assert len(ids) == len(text) == len(answer) <= 300
        if all(a == IGNORE_INDEX for a in answer):  # plain text: every token scored as prose
            assert text == ids
            kinds.add("text")
        else:  # retrieval: prose labels end where the answers begin
            first = next(i for i, a in enumerate(answer) if a != IGNORE_INDEX)
            assert text[:first] == ids[:first] and all(t == IGNORE_INDEX for t in text[first:])
            assert answer[first:] == ids[first:]
            kinds.add("retrieval")
    assert kinds == {"text", "retrieval"}
    batch = collate_rows(rows[:3], pad_token_id=0)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["answer_labels"].shape
    with pytest.raises(ValueError, match="text_fraction=1.5"):
        MixedRows(tokenizer, DOCS, 150, 300, text_fraction=1.5)


def _occurs(part: list[int], whole: list[int]) -> bool:
    return any(whole[i : i + len(part)] == part for i in range(len(whole) - len(part) + 1))


def test_recall_rows_quote_their_compressed_source_and_score_only_what_follows_each_cue(tokenizer):
    window, n_recall = 64, 0
    rows = MixedRows(tokenizer, DOCS, 200, 320, seed=5, text_fraction=0.25, recall_fraction=0.5, window=window,
                     templates=[0, 3], block=8)
    for r in [next(iter(rows.blocks()))[i] for i in range(8)]:
        ids, text, answer = r["input_ids"], r["text_labels"], r["answer_labels"]
        assert len(ids) == len(text) == len(answer) <= 320
        scored = [i for i, a in enumerate(answer) if a != IGNORE_INDEX]
        prose = [i for i, t in enumerate(text) if t != IGNORE_INDEX]
        if not scored or prose[-1] == len(ids) - 1:
            continue  # a plain-text or retrieval row
        n_recall += 1
        n_src = prose[-1] + 1
        assert n_src % window == 0 and text[:n_src] == ids[:n_src], "the source is whole windows, scored as prose"
        assert scored[0] > n_src, "every scored token comes after the source is compressed"
        source, runs, run = ids[:n_src], [], [scored[0]]
        for i in scored[1:]:
            if i == run[-1] + 1:
                run.append(i)
            else:
                runs.append(run)
                run = [i]
        runs.append(run)
        for run in runs:  # each quote: cue (unscored) + rest (scored), contiguous in the source
            rest = [ids[i] for i in run]
            cue_start = max(j for j in range(n_src, run[0]) if answer[j] == IGNORE_INDEX
                            and (j == n_src or answer[j - 1] != IGNORE_INDEX or ids[j - 1] in rows.newline))
            quote = ids[cue_start : run[0]] + rest
            # a sentence start is cut from the source's own tokens; a needle's cue and value are tokenized apart,
            # so its tokens may split differently, but the quote's text is in the source's text all the same
            assert _occurs(quote, source) or tokenizer.decode(quote).strip() in tokenizer.decode(source), \
                (tokenizer.decode(quote), cue_start, run)
    assert n_recall >= 2
    with pytest.raises(ValueError, match="recall_fraction=0.9"):
        MixedRows(tokenizer, DOCS, 200, 320, text_fraction=0.25, recall_fraction=0.9, window=64)
    with pytest.raises(ValueError, match="recall_fraction=0.21"):
        MixedRows(tokenizer, DOCS, 200, 320, text_fraction=0.8, recall_fraction=0.21, window=64)
    MixedRows(tokenizer, DOCS, 200, 320, text_fraction=0.8, recall_fraction=0.2, window=64)  # sums to 1 exactly
    with pytest.raises(ValueError, match="window=None"):
        MixedRows(tokenizer, DOCS, 200, 320, recall_fraction=0.5)
    with pytest.raises(ValueError, match="window=150"):
        MixedRows(tokenizer, DOCS, 200, 320, recall_fraction=0.5, window=150)


def test_draw_fact_splits_a_needle_at_its_value():
    import random

    from beacon_peft.training.synthetic import draw_fact

    for seed in range(20):
        cue, rest = draw_fact(random.Random(seed), [0, 4, 6])
        assert cue and rest and "{" not in cue + rest and not cue.endswith(" ")
    with pytest.raises(ValueError, match="templates="):
        draw_fact(random.Random(0), [99])


@pytest.mark.parametrize("path", READBACK_CONFIGS, ids=lambda p: p.name)
def test_readback_configs_parse(path):
    from beacon_peft.training.readback import parse_args

    args = parse_args(["--config", str(path)])
    assert args.max_tokens <= 8192 and args.probe_ratio in args.ratios


def test_readback_arguments_are_checked(tmp_path):
    from beacon_peft.training.readback import parse_args

    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1.0\n")
    with pytest.raises(ValueError, match="unknown keys \\['learning_rate'\\]"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="max_tokens=9000"):
        parse_args(["--max_tokens", "9000"])
    with pytest.raises(ValueError, match="min_tokens=10"):
        parse_args(["--min_tokens", "10"])
    with pytest.raises(ValueError, match="hidden_weight=-1.0: a loss weight: allowed >= 0"):
        parse_args(["--hidden_weight", "-1"])
    with pytest.raises(ValueError, match="logit_chunk=-1: allowed >= 0"):
        parse_args(["--logit_chunk", "-1"])
    for flag, value, allowed in (("batch_size", "0", ">= 1"), ("max_steps", "0", ">= 1"), ("eval_every", "0", ">= 1"),
                                 ("warmup_steps", "-1", ">= 0"), ("lr", "0", "> 0"), ("lr", "-0.001", "> 0"),
                                 ("temperature", "0", "> 0"), ("save_minutes", "0", "> 0")):
        with pytest.raises(ValueError, match=f"{flag}=.* is out of range: allowed {allowed}"):
            parse_args([f"--{flag}", value])
    assert parse_args(["--logit_chunk", "0"]).logit_chunk == 0
    with pytest.raises(ValueError, match=r"probe_ratio=2: .*allowed one of ratios \[4, 8\]"):
        parse_args(["--ratios", "4", "8", "--probe_ratio", "2"])
    assert parse_args(["--ratios", "2", "--probe_ratio", "2"]).probe_ratio == 2
    with pytest.raises(SystemExit):  # argparse: not a projection
        parse_args(["--beacon_projections", "q", "x"])


def _tiny_run_args(tmp_path, tokenizer) -> list[str]:
    """train_readback.py arguments for a tiny random Llama (saved with the real tokenizer) on the CPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return ["--model", str(tmp_path / "model"), "--device", "cpu", "--dtype", "float32", "--window", "64",
            "--ratios", "4", "8", "--min_tokens", "150", "--max_tokens", "300", "--batch_size", "2",
            "--probe_cases", "2", "--eval_every", "2", "--workers", "0", "--output_dir", str(tmp_path / "run"),
            "--hidden_weight", "1.0", "--log_every", "1", "--probe_ratio", "4"]


def test_a_checkpoint_restores_the_training_state_exactly_and_is_read_without_unpickling(tmp_path):
    """Three steps, checkpoint, two more; against a fresh model and optimizer restored from the checkpoint, the same
    two steps: equal adapter weights, Adam moments and RNG draws, bit for bit (the resume is exact). The state is
    read with ``torch.load(weights_only=True)``: a state.pt holding any other object (here a class instance, whose
    unpickling could run code) is refused before anything is restored."""
    import pickle
    import random

    from beacon_peft.training.readback.checkpoint import STATE_FILE, load_checkpoint, save_checkpoint

    def run(model, optimizer, steps: int) -> None:  # steps on batches drawn from `random` and torch
        for _ in range(steps):
            ids = torch.randint(0, 97, (2, 40 + random.randrange(10)))
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def adam(model):
        params = [p for p in model.parameters() if p.requires_grad]
        return params, torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)

    model = _tiny_beacon()
    model.train()
    params, optimizer = adam(model)
    random.seed(5)
    torch.manual_seed(5)
    run(model, optimizer, 3)
    save_checkpoint(model, optimizer, 3, 123, tmp_path)
    run(model, optimizer, 2)
    straight = [p.detach().clone() for p in params]
    moments = optimizer.state_dict()["state"]
    draws = (random.random(), torch.rand(3))

    fresh = _tiny_beacon()  # the same start as `model` before training (seeded), as a resumed process builds it
    fresh.train()
    fresh_params, fresh_optimizer = adam(fresh)
    random.seed(99)
    torch.manual_seed(99)  # whatever the new process drew before resuming
    assert load_checkpoint(fresh, fresh_optimizer, tmp_path, "cpu", base_lora=False) == (3, 123)
    run(fresh, fresh_optimizer, 2)
    assert all(torch.equal(a, b) for a, b in zip(straight, fresh_params))
    restored = fresh_optimizer.state_dict()["state"]
    assert restored.keys() == moments.keys() and all(
        torch.equal(restored[i][k], moments[i][k]) for i in moments for k in moments[i])
    again = (random.random(), torch.rand(3))
    assert again[0] == draws[0] and torch.equal(again[1], draws[1])
    assert load_checkpoint(fresh, fresh_optimizer, tmp_path / "nowhere", "cpu", base_lora=False) is None

    state = torch.load(tmp_path / "checkpoint" / STATE_FILE, weights_only=True)  # tensors and containers only
    state["step"] = Path("/somewhere")  # an object a weights-only load may not rebuild
    torch.save(state, tmp_path / "checkpoint" / STATE_FILE)
    before = [p.detach().clone() for p in fresh_params]
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(fresh, fresh_optimizer, tmp_path, "cpu", base_lora=False)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh_params))


def test_a_killed_run_resumes_from_its_checkpoint(tmp_path, tokenizer):
    """Two steps, stop; resume to three: the resumed run starts from the checkpoint's step and weights (with every
    loss term on, the layer-wise hidden-state distance included)."""
    from safetensors.torch import load_file

    from recipes.train_readback import main

    common = _tiny_run_args(tmp_path, tokenizer)
    main(common + ["--max_steps", "2"])
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["tokens"] > 0
    snapshot = tmp_path / "run" / "checkpoint" / "adapter"  # the checkpoint as a loadable adapter folder
    stored = load_file(str(snapshot / "adapter_model.safetensors"))
    assert stored.keys() == state["adapter"].keys()
    assert all(torch.equal(stored[k], state["adapter"][k]) for k in stored)
    assert json.loads((snapshot / "readback_args.json").read_text())["step"] == 2
    assert (snapshot / "adapter_config.json").is_file() and (snapshot / "tokenizer_config.json").is_file()
    curve_path = tmp_path / "run" / "curve.json"
    curve_path.write_text(json.dumps(json.loads(curve_path.read_text()) + [dict(step=9, tokens=1, key_information=0.0,
                                                                                context_gain=0.0)]))
    final = main(common + ["--max_steps", "3", "--resume"])  # drops the point after the checkpoint (a killed run's)
    resumed = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)
    assert resumed["step"] == 3 and resumed["tokens"] > state["tokens"]
    curve = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert [c["step"] for c in curve] == [0, 2, 3] and all(c["ratio"] == 4 for c in curve)  # --probe_ratio
    assert all(math.isfinite(c["key_information"]) and math.isfinite(c["context_gain"]) for c in curve)
    weights = load_file(str(final / "adapter_model.safetensors"))
    assert weights and all(k.startswith("base_model.") or "beacon" in k for k in weights)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["hidden"] > 0 and r["kl"] > 0 for r in log)
    moved = [k for k in state["adapter"] if not torch.equal(state["adapter"][k], resumed["adapter"][k])]
    assert moved, "the resumed step changed no adapter weight"
    args = json.loads((final / "readback_args.json").read_text())
    assert args["step"] == 3 and args["tokens"] == resumed["tokens"]


def test_a_fresh_run_into_an_earlier_runs_folder_is_refused(tmp_path, tokenizer):
    """Without --resume, an output_dir holding a run (checkpoint/, final/, curve.json, train_log.jsonl) is refused
    before anything is loaded, files unchanged; --overwrite_output_dir starts afresh (the log holds only the new
    run's steps)."""
    from recipes.train_readback import main

    common = _tiny_run_args(tmp_path, tokenizer)
    main(common + ["--max_steps", "2"])
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"holds an earlier run \(checkpoint, final, curve.json, train_log.jsonl\): "
                                         "allowed --resume to continue it, --overwrite_output_dir to replace it"):
        main(common + ["--max_steps", "1"])
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    main(common + ["--max_steps", "1", "--overwrite_output_dir"])
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1]
    assert [c["step"] for c in json.loads((run / "curve.json").read_text())] == [0, 1]


def test_init_adapter_can_grow_beacon_o_and_starts_computing_what_the_folder_did(tmp_path, tokenizer):
    """--beacon_projections q k v o from a q/k/v adapter: the new beacon_o copies start as the base's o_proj, so
    the grown model's compressed logits equal the folder's adapter's; a folder missing anything else, or holding
    weights the model lacks, is refused."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from beacon_peft.training.readback import parse_args
    from beacon_peft.training.readback.modeling import check_init_keys, load
    from recipes.train_readback import main

    common = _tiny_run_args(tmp_path, tokenizer)
    folder = main(common + ["--max_steps", "1", "--lr", "0.05"])  # a q/k/v adapter that moved off its start
    grown, _ = load(parse_args(common + ["--init_adapter", str(folder), "--beacon_projections", "q", "k", "v", "o"]))
    assert any(".beacon_o." in name for name, _ in grown.named_parameters())
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), folder)
    ids = torch.randint(5, len(tokenizer), (1, 200))  # three windows of 64: two compressed
    for model in (grown, plain):
        model.eval()
        model.base_model.set_compression_ratio(8)
    with torch.no_grad():
        torch.testing.assert_close(grown(input_ids=ids).logits, plain(input_ids=ids).logits)
        grown.base_model.set_compression_ratio(None)
        for name, module in grown.named_modules():  # the grown model really reads its beacon_o copies
            if name.endswith("beacon_o.default"):
                module.weight.add_(0.1)
        grown.base_model.set_compression_ratio(8)
        assert not torch.allclose(grown(input_ids=ids).logits, plain(input_ids=ids).logits)

    weights = load_file(str(folder / "adapter_model.safetensors"))
    names = set(weights)
    with pytest.raises(ValueError, match="weights missing"):
        check_init_keys(names, names - {"base_model.beacon_embedding"}, folder)
    one_k = next(n for n in names if ".beacon_k." in n)
    with pytest.raises(ValueError, match="weights missing"):
        check_init_keys(names, names - {one_k}, folder)
    with pytest.raises(ValueError, match="lacks"):
        check_init_keys(names - {one_k}, names, folder)
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in folder.iterdir():
        if f.name != "adapter_model.safetensors":
            (partial / f.name).write_bytes(f.read_bytes())
    save_file({k: v for k, v in weights.items() if k != one_k}, str(partial / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="weights missing"):
        load(parse_args(common + ["--init_adapter", str(partial)]))


def test_a_base_lora_trains_with_the_beacons_leaves_the_teacher_the_base_and_round_trips(tmp_path, tokenizer):
    """--base_lora_r: a LoRA on the raw-token path trains beside the beacon adapter (nothing else does); the
    teacher (adapter disabled) is still exactly the base; checkpoint, resume and the saved folder carry the LoRA,
    and `load_trained` of the folder computes what the training process does; mismatches are refused."""
    from transformers import AutoModelForCausalLM

    from beacon_peft.training import load_trained
    from beacon_peft.training.readback import parse_args
    from beacon_peft.training.readback.modeling import load
    from recipes.train_readback import main

    common = _tiny_run_args(tmp_path, tokenizer) + ["--base_lora_r", "4", "--base_lora_targets", "q_proj", "v_proj"]
    folder = main(common + ["--max_steps", "2", "--lr", "0.05"])
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)
    lora_b = [k for k in state["base_lora"] if "lora_B" in k]
    assert len(lora_b) == 2 * 2 and all(state["base_lora"][k].abs().sum() > 0 for k in lora_b)  # 2 layers x q, v
    assert not any("lora" in k for k in state["adapter"])  # the beacon adapter's weights stay apart
    curve = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert all(0 <= c["key_token_accuracy"] <= 1 and c["key_exact"] in (0, 0.5, 1) for c in curve)

    trained, _ = load(parse_args(common + ["--init_adapter", str(folder)]))
    grads = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert grads and all("beacon" in n or ".lora_A.base_lora" in n or ".lora_B.base_lora" in n for n in grads)
    assert any("lora_B" in n for n in grads) and any("beacon" in n for n in grads)
    reloaded = load_trained(folder, base_model=AutoModelForCausalLM.from_pretrained(tmp_path / "model"))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = torch.randint(5, len(tokenizer), (1, 200))  # three windows of 64: two compressed
    for model in (trained, reloaded):
        model.eval()
        model.base_model.set_compression_ratio(8)
    with torch.no_grad():
        compressed = trained(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, compressed, rtol=1e-4, atol=1e-4)
        with trained.disable_adapter():  # the teacher: no beacons and no LoRA
            torch.testing.assert_close(trained(input_ids=ids).logits, base(input_ids=ids).logits)

    resumed = main(common + ["--max_steps", "3", "--resume"])
    after = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)
    assert after["step"] == 3 and json.loads((resumed / "readback_args.json").read_text())["step"] == 3
    assert any(not torch.equal(state["base_lora"][k], after["base_lora"][k]) for k in lora_b)
    plain = _tiny_run_args(tmp_path, tokenizer)
    with pytest.raises(ValueError, match="base LoRA"):  # a folder with a LoRA, a run without one
        load(parse_args(plain + ["--init_adapter", str(folder)]))
    with pytest.raises(ValueError, match="base LoRA weights do not match"):  # resuming the LoRA run without it
        main(plain + ["--max_steps", "4", "--resume"])
    with pytest.raises(ValueError, match="base_lora_r=-1"):
        parse_args(plain + ["--base_lora_r", "-1"])

    from safetensors.torch import load_file

    from recipes.export_readback import main as export_main

    exported = export_main([str(resumed), "--out", str(tmp_path / "export"), "--ratios", "4", "8"])
    stored, trained_lora = load_file(str(exported / "base_lora" / "adapter_model.safetensors")), after["base_lora"]
    assert stored.keys() == trained_lora.keys()
    assert all(stored[k].dtype == torch.bfloat16 and torch.equal(stored[k], trained_lora[k].bfloat16()) for k in stored)
    card = (exported / "README.md").read_text()
    assert "## Base LoRA" in card and "load_trained" in card
    loaded = load_trained(exported, base_model=AutoModelForCausalLM.from_pretrained(tmp_path / "model"))
    merged = [v for k, v in loaded.get_base_model().state_dict().items() if k.endswith("q_proj.weight")]
    plain_q = [v for k, v in base.state_dict().items() if k.endswith("q_proj.weight")]
    assert len(merged) == len(plain_q) == 2 and all(not torch.equal(a, b) for a, b in zip(merged, plain_q))
    with pytest.raises(ValueError, match="holds a base LoRA"):  # averaging the beacons alone is refused
        export_main([str(resumed), "--out", str(tmp_path / "avg"), "--average_with", str(exported),
                     "--average_weight", "0.5"])
    assert not (tmp_path / "avg").exists()


def test_export_writes_a_bfloat16_adapter_with_its_history_that_loads_and_never_overwrites(tmp_path, tokenizer):
    """Two read-back stages (the second from the first), exported: weights stored in bfloat16 equal the trained
    ones rounded, the config has the new ratios, the card lists both stages and the evaluation file, PEFT loads
    it; bad ratios and an existing --out are refused before anything is written."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from recipes.export_readback import main as export_main
    from recipes.train_readback import main

    common = _tiny_run_args(tmp_path, tokenizer)
    first = main(common + ["--max_steps", "1"])
    second = main(common[:-6] + ["--output_dir", str(tmp_path / "run2"), "--init_adapter", str(first),
                                 "--max_steps", "2", "--ratios", "8", "--lr", "1e-3"])
    result = tmp_path / "probe.md"
    result.write_text("# Memory probe (quick)\n\n- command: `probe --quick`\n\n## Key information\n\n| a | b |\n")
    out = tmp_path / "exported"
    with pytest.raises(ValueError, match="ratios entry"):
        export_main([str(second), "--out", str(out), "--ratios", "4", "1000"])  # above the stride (64)
    with pytest.raises(ValueError, match="evaluation files"):
        export_main([str(second), "--out", str(out), "--evaluation", str(tmp_path / "missing.md")])
    assert not out.exists()
    export_main([str(second), "--out", str(out), "--ratios", "2", "4", "8", "--evaluation", str(result)])
    trained = load_file(str(second / "adapter_model.safetensors"))
    stored = load_file(str(out / "adapter_model.safetensors"))
    assert stored.keys() == trained.keys() and all(v.dtype == torch.bfloat16 for v in stored.values())
    assert all(torch.equal(stored[k], trained[k].to(torch.bfloat16)) for k in trained)
    assert json.loads((out / "adapter_config.json").read_text())["ratios"] == [2, 4, 8]
    card = (out / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    first_tokens = json.loads((first / "readback_args.json").read_text())["tokens"]
    assert len(rows) == 2 and rows[0].endswith(f"| 1 | {first_tokens:,} |") and "| [8] | 0.001 | 2 |" in rows[1]
    assert "### Memory probe (quick)" in card and "- command: `probe --quick`" in card
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    model = PeftModel.from_pretrained(base, out)
    loaded = get_peft_model_state_dict(model)
    assert all(torch.equal(loaded[k].float(), stored[k].float()) for k in stored)
    model.base_model.set_compression_ratio(8)
    assert torch.isfinite(model(input_ids=torch.randint(0, 100, (1, 200))).logits).all()
    (out / "README.md").write_text("mine")
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        export_main([str(second), "--out", str(out)])
    assert (out / "README.md").read_text() == "mine"


def test_export_reads_the_first_adapter_from_where_it_moved(tmp_path):
    """--root: the adapter the first stage started from moved after training (the previously shipped adapter kept
    under -v1 when its successor takes its folder); its card is read from there, the card names both paths, and a
    --root that is no adapter folder is refused before anything is written."""
    from recipes.export_readback import history_lines, parse_args

    moved = tmp_path / "adapter-v1"
    moved.mkdir()
    (moved / "adapter_config.json").write_text("{}")
    (moved / "README.md").write_text("# v1\n\n## Data\n\n- dataset: `offline:all`\n\n## Evaluation\n\nold\n")
    stage = dict(config="c.yaml", min_tokens=3000, max_tokens=4000, text_fraction=0.8, recall_fraction=0.2,
                 answer_weight=1.0, ratios=[8], lr=1e-4, step=3, tokens=100, held_out_templates=[2])
    text = "\n".join(history_lines([stage], moved, recorded=Path("adapters/old")))
    assert f"started from `{moved}` (recorded as `adapters/old`, moved since)." in text
    assert "- dataset: `offline:all`" in text and "old" not in text.split("moved since")[1]
    # a root that is itself an exported read-back adapter: its stage table and its own history come along
    shipped = tmp_path / "adapter-v2"
    shipped.mkdir()
    (shipped / "README.md").write_text("\n".join(history_lines([stage | dict(config="v2.yaml")], moved))
                                       + "\n## Evaluation\n\nv2 figures\n")
    text = "\n".join(history_lines([stage | dict(config="v3.yaml")], shipped))
    assert text.index("`v3.yaml`") < text.index(f"history of `{shipped}`") < text.index("`v2.yaml`")
    assert "### Training" in text and "#### Data" in text and "- dataset: `offline:all`" in text
    assert "v2 figures" not in text and "## Evaluation" not in text
    run = tmp_path / "final"
    run.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "readback_args.json"):
        (run / name).write_text("{}")
    with pytest.raises(ValueError, match="root="):
        parse_args([str(run), "--out", str(tmp_path / "out"), "--root", str(tmp_path / "nowhere")])
    assert parse_args([str(run), "--out", str(tmp_path / "out"), "--root", str(moved)]).root == moved
    assert not (tmp_path / "out").exists()


def test_export_sees_a_first_adapter_folder_replaced_by_a_later_stage_and_asks_for_root(tmp_path):
    """The folder the first stage started from (the shipped adapter) now holds a later stage's export whose
    init_adapter leads back into the chain: the chain stops there and says so, and without --root the export refuses
    before writing anything (the --root path itself: test_export_reads_the_first_adapter_from_where_it_moved); a
    plain chain is not called replaced, and the stage bound still holds."""
    from recipes.export_readback import main as export_main
    from recipes.export_readback import stages

    def stage(name: str, init: str | None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (folder / f).write_text("{}")
        (folder / "readback_args.json").write_text(json.dumps(dict(init_adapter=init)))
        return folder

    s1 = stage("s1", str(tmp_path / "shipped"))
    shipped = stage("shipped", str(s1))  # the later export now in the folder s1 started from
    s2 = stage("s2", str(s1))
    s3 = stage("s3", str(s2))
    chain, root, replaced = stages(s3)
    assert [c["folder"] for c in chain] == [str(s1), str(s2), str(s3)] and root == shipped and replaced
    with pytest.raises(ValueError, match="now holds a later stage's export.*--root"):
        export_main([str(s3), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    fresh = stage("fresh", None)
    assert stages(stage("next", str(fresh))) == ([{"init_adapter": None, "folder": str(fresh)},
                                                   {"init_adapter": str(fresh), "folder": str(tmp_path / "next")}],
                                                  None, False)
    with pytest.raises(ValueError, match="more than 2 stages"):
        stages(s3, max_stages=2)


def test_export_of_a_stage_trained_from_the_shipped_export_keeps_every_stage(tmp_path):
    """A stage trained from the shipped folder (which holds an earlier stage's export, whose history starts from
    that folder's previous content): the shipped export is a stage of the chain, every earlier stage is kept, and
    the walk ends when it comes back to the shipped folder, replaced."""
    from recipes.export_readback import stages

    def stage(name: str, init: str, trained: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "readback_args.json").write_text(json.dumps(dict(init_adapter=init, output_dir=trained)))
        return folder

    shipped = str(tmp_path / "shipped")
    s1 = stage("s1", shipped, "run1")  # trained from what the shipped folder held then
    s2 = stage("s2", str(s1), "run2")
    stage("shipped", str(s1), "run2")  # s2's export, now in the shipped folder
    s3 = stage("s3", shipped, "run3")  # trained from the shipped export
    chain, root, replaced = stages(s3)
    assert [c["folder"] for c in chain] == [str(s1), shipped, str(s3)] and root == Path(shipped) and replaced
    assert s2.is_dir()  # s2 itself is not on the walk: the shipped folder stands for it


def test_export_card_names_composed_rows_apart_from_template_rows():
    """The card's mix column: composed retrieval rows (``composed_fraction``) are named apart from the template
    retrieval rows, which take what is left; a stage recorded before composed rows existed reads as before."""
    from recipes.export_readback import _mix

    stage = dict(text_fraction=0.35, recall_fraction=0.15, composed_fraction=0.4)
    assert _mix(stage) == "35% plain text, 15% recall, 40% composed QA, 10% template QA"
    assert _mix(stage | dict(text_fraction=0.7, recall_fraction=0.2, composed_fraction=0.1)) == (
        "70% plain text, 20% recall, 10% composed QA")
    assert _mix(dict(text_fraction=0.2, recall_fraction=0.5)) == "20% plain text, 50% recall, 30% template QA"


def test_export_can_store_a_weight_average_with_another_adapter_and_refuses_a_different_structure(tmp_path, tokenizer):
    """--average_with OTHER --average_weight W stores (1 - W) * adapter + W * OTHER (then rounded to bfloat16) and
    says so in the card; a weight outside (0, 1), a lone flag, and an adapter whose beacon config differs (here the
    window) are refused before anything is written."""
    import shutil

    from safetensors.torch import load_file, save_file

    from recipes.export_readback import main as export_main
    from recipes.train_readback import main

    final = main(_tiny_run_args(tmp_path, tokenizer) + ["--max_steps", "1"])
    mine = load_file(str(final / "adapter_model.safetensors"))
    other = tmp_path / "other"
    shutil.copytree(final, other)
    save_file({k: 3.0 * v + 1.0 for k, v in mine.items()}, str(other / "adapter_model.safetensors"))
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(config | {"ratios": [2]}))  # ratios may differ
    out = tmp_path / "averaged"
    with_other = ["--average_with", str(other)]
    for bad, match in ((with_other + ["--average_weight", "1.0"], "average_weight=1.0"),
                       (with_other + ["--average_weight", "0"], "average_weight=0.0"), (with_other, "go together"),
                       (["--average_weight", "0.5"], "go together")):
        with pytest.raises(ValueError, match=match):
            export_main([str(final), "--out", str(out)] + bad)
    wrong = tmp_path / "wrong"
    shutil.copytree(other, wrong)
    (wrong / "adapter_config.json").write_text(json.dumps(config | {"window": 32}))
    with pytest.raises(ValueError, match=r"differ in \['window'\]"):
        export_main([str(final), "--out", str(out), "--average_with", str(wrong), "--average_weight", "0.25"])
    assert not out.exists()
    export_main([str(final), "--out", str(out), "--ratios", "4", "8", "--average_with", str(other),
                 "--average_weight", "0.25"])
    stored = load_file(str(out / "adapter_model.safetensors"))
    assert stored.keys() == mine.keys()
    for k, v in mine.items():  # 0.75 v + 0.25 (3 v + 1) = 1.5 v + 0.25
        assert torch.equal(stored[k], (0.75 * v + 0.25 * (3.0 * v + 1.0)).to(torch.bfloat16))
        assert not torch.equal(stored[k], v.to(torch.bfloat16))
    assert "`0.75 x` the last stage above plus `0.25 x` the adapter" in (out / "README.md").read_text()


def test_the_curve_plot_writes_a_png_and_table_and_never_overwrites(tmp_path):
    from recipes.plot_readback import main as plot_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "curve.json").write_text(json.dumps([dict(step=0, tokens=0, key_information=0.01, context_gain=0.2),
                                                dict(step=10, tokens=5000, key_information=0.5, context_gain=0.25)]))
    (run / "train_log.jsonl").write_text(json.dumps(dict(step=10, tokens=5000, text=9.9, answer=9.9, kl=9.9)) + "\n"
                                         + json.dumps(dict(step=10, tokens=5000, text=3.1, answer=1.2, kl=0.2)) + "\n")
    # step 10 logged twice (a resume from an older checkpoint): the later record is the one shown
    assert plot_main([str(run), "--out", str(tmp_path / "out"), "--name", "t"]) == 0
    table = (tmp_path / "out" / "t_curve.md").read_text().splitlines()
    assert table[0].startswith("| step | tokens | key information (nats, ratio 8) | context gain (nats, ratio 8) |")
    assert table[2].startswith("| 0 | 0 | 0.010 | 0.200 |")
    assert table[3] == "| 10 | 5,000 | 0.500 | 0.250 | 3.10 | 1.20 | 0.20 |"
    assert (tmp_path / "out" / "t_curve.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        plot_main([str(run), "--out", str(tmp_path / "out"), "--name", "t"])
    (run / "train_log.jsonl").write_text(json.dumps(dict(step=10, tokens=5000, text=3.1, answer=1.2, kl=0.2,
                                                         hidden=0.0712)) + "\n")
    assert plot_main([str(run), "--out", str(tmp_path / "out"), "--name", "h"]) == 0
    table = (tmp_path / "out" / "h_curve.md").read_text().splitlines()
    assert table[0].endswith("| KL to base | hidden distance |")
    assert table[3] == "| 10 | 5,000 | 0.500 | 0.250 | 3.10 | 1.20 | 0.20 | 0.071 |"
    with pytest.raises(ValueError, match="no curve.json"):
        plot_main([str(tmp_path), "--out", str(tmp_path / "out"), "--name", "u"])
    point = dict(step=0, tokens=0, ratio=2, key_information=0.1, context_gain=0.2)
    (run / "curve.json").write_text(json.dumps([point]))
    assert plot_main([str(run), "--out", str(tmp_path / "out"), "--name", "r2"]) == 0  # a --probe_ratio 2 run
    assert "key information (nats, ratio 2)" in (tmp_path / "out" / "r2_curve.md").read_text()
    exact = dict(step=0, tokens=0, key_information=3.04, key_token_accuracy=0.75, key_exact=0.0, context_gain=0.68)
    (run / "curve.json").write_text(json.dumps([exact]))  # a curve scoring exact read-back (recipe 15 on)
    assert plot_main([str(run), "--out", str(tmp_path / "out"), "--name", "x"]) == 0
    table = (tmp_path / "out" / "x_curve.md").read_text().splitlines()
    assert "| key tokens right | keys exact | context gain" in table[0]
    assert table[2].startswith("| 0 | 0 | 3.040 | 75% | 0% | 0.680 |")


def test_readback_evaluation_scores_compressed_needles_apart_and_never_overwrites(tmp_path):
    """`recipes/eval_readback.py`'s table counts the cases whose needle sat in a compressed window apart from all
    cases (an open-window needle is read from raw tokens), and ``--out`` is never overwritten."""
    from recipes.eval_readback import main as eval_main
    from recipes.eval_readback import table

    results = dict(passkey=[dict(length=4096, compressed=True, beacon=True, full=True, digits=1.0),
                            dict(length=4096, compressed=True, beacon=False, full=False, digits=0.6),
                            dict(length=4096, compressed=False, beacon=True, full=True, digits=1.0),
                            dict(length=8192, compressed=True, beacon=True, digits=1.0, full=None),
                            dict(length=32768, compressed=True, beacon=False, digits=0.0)],
                   needles=[dict(length=4096, group="trained", compressed=False, ok=True),
                            dict(length=4096, group="trained", compressed=True, ok=False),
                            dict(length=4096, group="held_out", compressed=True, ok=True)])
    lines = table(results, 8, [4096, 32768, 8192], [4096], ["trained", "held_out"]).splitlines()
    assert lines[0] == ("| test | length | beacon, needle compressed (ratio 8) | beacon, all cases "
                        "| full attention | key digits right, needle compressed |")
    assert lines[2] == "| pass key | 4096 | 1/2 | 2/3 | 2/3 | 80% |"  # digits: mean of 1.0 and 0.6
    assert lines[3] == "| pass key | 32768 | 0/1 | 0/1 | beyond native positions | 0% |"
    assert lines[4] == "| pass key | 8192 | 1/1 | 1/1 | not run | 100% |"  # --no_full: full is None
    assert lines[5] == "| needles, trained phrasings | 4096 | 0/1 | 1/2 | | |"
    assert lines[6] == "| needles, held_out phrasings | 4096 | 1/1 | 1/1 | | |"
    out = tmp_path / "eval.json"
    out.write_text("keep")
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        eval_main(["--adapter", str(tmp_path), "--out", str(out)])
    assert out.read_text() == "keep"
