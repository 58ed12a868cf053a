"""The adapter over tiny Llama / Mistral / Qwen2 / Qwen3 models: training, generation, lifecycle, base parity."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import ARCHS, perturb_beacons, random_ids, tiny_model

import beacon_peft
from beacon_peft import BeaconConfig
from beacon_peft.training.collator import BeaconCollator

W = 16


def beacon_model(arch="llama", seed=0, attn="eager", **kw):
    config = BeaconConfig(window=kw.pop("window", W), ratios=kw.pop("ratios", [4]), **kw)
    model = get_peft_model(tiny_model(arch, seed, attn), config)
    perturb_beacons(model)
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_train_step_gradients_only_in_beacons(arch):
    model = beacon_model(arch, sink_size=1).train()
    ids = random_ids(2, 3 * W + 7)  # 3 full windows + a partial one
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (2, ids.shape[1], 128)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads, "no gradient reached the adapter"
    assert all("beacon_" in n for n in grads), sorted(grads)
    # a last-layer beacon query only shapes the beacon's own final hidden state, which nothing reads: frozen
    dead = {n for n, _ in model.named_parameters() if ".layers.1.self_attn.beacon_q." in n}
    beacon_params = {n for n, p in model.named_parameters() if "beacon_" in n}
    assert dead and set(grads) == beacon_params - dead
    assert all(not p.requires_grad for n, p in model.named_parameters() if "beacon_" not in n or n in dead)
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert model.base_model.ratios_last_call() == [4] * 3  # 3 full windows; the final one gets no beacons


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradient_flows_through_memory_into_earlier_windows(arch):
    model = beacon_model(arch).train()
    ids = random_ids(1, 3 * W)
    labels = torch.full_like(ids, -100)
    labels[:, -W // 2 :] = ids[:, -W // 2 :]  # loss only inside the last window, which has no beacons in training
    model(input_ids=ids, labels=labels).loss.backward()
    embedding = model.base_model.beacon_embedding["default"]
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    layer0 = model.base_model.model.model.layers[0].self_attn
    assert layer0.beacon_k["default"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_beacons_learn_to_carry_a_key_through_compressed_memory(arch):
    """Four contexts differ only in one key token in the first window; the answer (that key) is predicted from the
    end of the second window, which sees the first one only through its beacons. A prior over the four keys
    cannot tell them apart, so the answer NLL after the right context falls below the NLL after the others only
    if training made the beacons hold the key."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(arch), BeaconConfig(window=W, ratios=[4])).train()
    filler = random_ids(1, 2 * W, seed=5)[0]
    keys = [10, 20, 30, 40]

    def answer_nll(context_key: int, answer_key: int) -> torch.Tensor:
        ids = torch.cat([filler, torch.tensor([answer_key])])[None]  # (1, 2W + 1)
        ids[0, 5] = context_key  # inside window 1, compressed before window 2's last token reads it
        labels = torch.full_like(ids, -100)
        labels[0, -1] = answer_key
        return model(input_ids=ids, labels=labels).loss

    def own_and_other() -> tuple[float, float]:
        with torch.no_grad():
            nll = [[answer_nll(i, j).item() for j in keys] for i in keys]
        own = sum(nll[i][i] for i in range(4)) / 4
        return own, sum(nll[i][j] for i in range(4) for j in range(4) if i != j) / 12

    own, other = own_and_other()
    assert abs(other - own) < 0.5  # untrained: the memory tells the keys (almost) nothing apart
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for step in range(160):
        answer_nll(keys[step % 4], keys[step % 4]).backward()
        optimizer.step()
        optimizer.zero_grad()
    own, other = own_and_other()
    assert other - own > 2.0, (own, other)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_matches_manual_greedy_loop(arch):
    model = beacon_model(arch, sink_size=1)
    ids = random_ids(1, 2 * W + 5)
    gen = model.generate(input_ids=ids, max_new_tokens=W + 3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert gen.shape == (1, ids.shape[1] + W + 3)
    with torch.no_grad():
        out = model(input_ids=ids)
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        memory = out.past_key_values
        for _ in range(W + 2):
            out = model(input_ids=tokens[-1], past_key_values=memory)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    assert gen[:, ids.shape[1] :].tolist() == torch.cat(tokens, 1).tolist()
    # each call starts from an empty memory: a second generate gives the same ids
    again = model.generate(input_ids=ids, max_new_tokens=W + 3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(gen, again)
    sampled = model.generate(input_ids=ids, max_new_tokens=5, do_sample=True, top_k=5, pad_token_id=0)
    assert sampled.shape[1] == ids.shape[1] + 5
    # beam search reorders the memory's rows (BeaconMemory.reorder_cache); one beam is greedy search
    one_beam = model.generate(input_ids=ids, max_new_tokens=W + 3, num_beams=1, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
    assert torch.equal(one_beam, gen)
    beams = model.generate(input_ids=ids.expand(2, -1), max_new_tokens=W + 3, num_beams=3, do_sample=False,
                           pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    assert beams.sequences.shape == (2, ids.shape[1] + W + 3) and torch.equal(beams.sequences[0], beams.sequences[1])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_load_round_trip(arch, tmp_path):
    model = beacon_model(arch)
    ids = random_ids(1, 3 * W)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all("beacon_" in k for k in saved)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BEACON"
    reloaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_disabled_adapter_gives_base_logits_exactly(arch):
    base = tiny_model(arch)
    ids = random_ids(2, 3 * W)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_peft_model(tiny_model(arch), BeaconConfig(window=W, ratios=[4]))
    perturb_beacons(model)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, expected, atol=1e-3)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)
        assert not torch.allclose(model(input_ids=ids).logits, expected, atol=1e-3)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_compression_off_equals_full_attention(arch, attn):
    base = tiny_model(arch, attn=attn)
    ids = random_ids(2, 4 * W + 5)
    with torch.no_grad():
        expected = base(input_ids=ids, labels=ids)
    model = get_peft_model(tiny_model(arch, attn=attn), BeaconConfig(window=W, ratios=[0]))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    assert abs(out.loss.item() - expected.loss.item()) < 1e-5
    assert out.past_key_values.sizes() == {"sink": 0, "comp": 4 * W, "raw": 5, "total": 4 * W + 5, "tokens": 4 * W + 5}
    gen_base = base.generate(input_ids=ids[:1], max_new_tokens=W, do_sample=False, pad_token_id=0)
    gen = model.generate(input_ids=ids[:1], max_new_tokens=W, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, gen_base)
    if arch == "llama":  # beam search reorders memory rows: still the base model's beams
        kw = dict(max_new_tokens=W // 2, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(model.generate(input_ids=ids, **kw), base.generate(input_ids=ids, **kw))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_output_hidden_states_are_every_layer_of_the_raw_tokens(arch):
    """Every layer's hidden states of the raw tokens, in input order: equal to the base's with compression off
    and before the first beacon (nothing of the adapter read yet); the last one is what lm_head reads."""
    base = tiny_model(arch)
    ids = random_ids(2, 3 * W + 5)
    with torch.no_grad():
        expected = base(input_ids=ids, output_hidden_states=True).hidden_states
        off = get_peft_model(tiny_model(arch), BeaconConfig(window=W, ratios=[0]))
        got = off(input_ids=ids, output_hidden_states=True).hidden_states
        assert len(got) == len(expected) == base.config.num_hidden_layers + 1
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
        model = beacon_model(arch, sink_size=1, ratios=[4])
        out = model(input_ids=ids, output_hidden_states=True)
        assert model(input_ids=ids).hidden_states is None
    assert len(out.hidden_states) == len(expected)
    for g, e in zip(out.hidden_states, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g[:, :4], e[:, :4], atol=1e-5, rtol=1e-5)  # before the first beacon
    assert not torch.allclose(out.hidden_states[-1][:, W:], expected[-1][:, W:], atol=1e-3)
    lm_head = model.get_output_embeddings()
    torch.testing.assert_close(lm_head(out.hidden_states[-1]), out.logits, atol=1e-5, rtol=1e-5)


def test_output_hidden_states_continue_from_a_memory_as_one_call():
    model = beacon_model("llama", sink_size=1)
    ids = random_ids(1, 3 * W + 5)
    with torch.no_grad():
        whole = model(input_ids=ids, output_hidden_states=True).hidden_states
        memory = model(input_ids=ids[:, : 2 * W]).past_key_values
        rest = model(input_ids=ids[:, 2 * W :], past_key_values=memory, output_hidden_states=True).hidden_states
    for w, r in zip(whole, rest):
        torch.testing.assert_close(w[:, 2 * W :], r, atol=1e-5, rtol=1e-5)


def test_output_hidden_states_carry_gradients_into_the_beacons():
    model = beacon_model("llama", sink_size=1).train()
    out = model(input_ids=random_ids(1, 2 * W + 3), output_hidden_states=True)
    out.hidden_states[2][:, W:].square().sum().backward()  # a middle layer, tokens that read the memory
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads.values())
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen == []


def test_left_padded_rows_keep_each_rows_hidden_states():
    model = beacon_model("llama", sink_size=1)
    rows = [random_ids(1, 2 * W + 5, seed=1)[0], random_ids(1, W + 3, seed=2)[0]]
    ids = torch.zeros(2, 2 * W + 5, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, ids.shape[1] - len(row) :], mask[b, ids.shape[1] - len(row) :] = row, 1
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for b, row in enumerate(rows):
            alone = model(input_ids=row[None], output_hidden_states=True).hidden_states
            for g, a in zip(batch, alone):
                torch.testing.assert_close(g[b, ids.shape[1] - len(row) :], a[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_rows_match_each_row_alone(arch, attn):
    model = beacon_model(arch, attn=attn, sink_size=1)
    lengths = [3 * W + 5, 2 * W - 3, W + 1]
    rows = [random_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    longest = max(lengths)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, longest - len(row) :] = row
        mask[b, longest - len(row) :] = 1
    with torch.no_grad():
        batch_out = model(input_ids=ids, attention_mask=mask)
        for b, row in enumerate(rows):
            alone = model(input_ids=row[None]).logits[0]
            torch.testing.assert_close(batch_out.logits[b, longest - len(row) :], alone, atol=1e-5, rtol=1e-5)
            assert batch_out.past_key_values.sizes(b) == model(input_ids=row[None]).past_key_values.sizes(0)
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=W + 2, do_sample=False, pad_token_id=0)
    for b, row in enumerate(rows):
        alone = model.generate(input_ids=row[None], max_new_tokens=W + 2, do_sample=False, pad_token_id=0)
        assert gen[b, longest:].tolist() == alone[0, len(row) :].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_right_padded_rows_match_each_row_alone(arch, attn):
    """Right padding (what the training collator makes): each row's logits on its real tokens and its memory are
    those of the row alone, as for left padding above."""
    model = beacon_model(arch, attn=attn, sink_size=1)
    rows = [random_ids(1, n, seed=i)[0] for i, n in enumerate([3 * W + 5, 2 * W - 3, W + 1])]
    batch = BeaconCollator(pad_token_id=0, window=W, mask_first_window=False)([{"input_ids": r} for r in rows])
    assert batch["attention_mask"][1:, -1].eq(0).all()  # padded on the right
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for b, row in enumerate(rows):
            alone = model(input_ids=row[None])
            torch.testing.assert_close(out.logits[b, : len(row)], alone.logits[0], atol=1e-5, rtol=1e-5)
            assert out.past_key_values.sizes(b) == alone.past_key_values.sizes(0)


@pytest.mark.parametrize("placement", ["interleave", "append"])
def test_right_padded_training_batch_gives_each_rows_loss_and_gradients(placement):
    """A training batch from `BeaconCollator` (right-padded, labels blank on padding and, for append, on the first
    window): its loss over all real predictions is the rows' losses weighted by their predictions, and its gradients
    are the sum of the rows' own."""
    config = dict(window=W, ratios=[4], placement=placement, sink_size=1)
    model = beacon_model("llama", **config).train()
    rows = [random_ids(1, n, seed=i)[0] for i, n in enumerate([3 * W + 5, 2 * W - 3, W + 6])]
    collate = BeaconCollator(0, W, BeaconConfig(**config).masks_first_window())
    batch = collate([{"input_ids": r} for r in rows])
    counts = [int((collate([{"input_ids": r}])["labels"][0, 1:] != -100).sum()) for r in rows]
    total = sum(counts)
    assert int((batch["labels"][:, 1:] != -100).sum()) == total

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    out = model(**batch, num_items_in_batch=torch.tensor(total))  # the Trainer's normaliser: sum / real predictions
    out.loss.backward()
    together = grads()
    losses = []
    for row, count in zip(rows, counts):
        alone = model(**collate([{"input_ids": row}]))
        torch.testing.assert_close(out.logits[len(losses), : len(row)], alone.logits[0], atol=1e-5, rtol=1e-5)
        (alone.loss * count / total).backward()  # gradients accumulate over the rows
        losses.append(alone.loss.item())
    apart = grads()
    assert together and together.keys() == apart.keys()
    torch.testing.assert_close(out.loss.item(), sum(loss * c for loss, c in zip(losses, counts)) / total, atol=1e-5,
                               rtol=1e-5)
    for name, grad in together.items():
        torch.testing.assert_close(grad, apart[name], atol=1e-5, rtol=1e-4, msg=name)


def test_memory_size_formula_and_reading():
    model = beacon_model("llama", sink_size=2, ratios=[4])
    n = 5 * W + 6
    with torch.no_grad():
        memory = model(input_ids=random_ids(1, n)).past_key_values
    # sink + N/r for completed windows + the open window's raw tokens and beacons
    assert memory.sizes() == {"sink": 2, "comp": 5 * W // 4, "raw": 6 + 6 // 4, "total": 2 + 5 * W // 4 + 7,
                              "tokens": n}
    k, v = memory.layer_kv(1, "comp")
    assert k.shape == v.shape == (2, 5 * W // 4, 16)
    assert memory.nbytes() == 2 * 2 * 2 * (2 + 5 * W // 4 + 7) * 16 * 4  # layers x (k, v) x heads x entries x D x 4B
    assert memory.get_seq_length() == n
    assert memory.ratios_used == [4] * 6


def test_adapter_lifecycle(tmp_path):
    model = beacon_model("llama")
    ids = random_ids(1, 3 * W)
    with torch.no_grad():
        first = model(input_ids=ids).logits
    model.add_adapter("other", BeaconConfig(window=W, ratios=[2]))
    model.set_adapter("other")
    with torch.no_grad():
        other = model(input_ids=ids).logits
    assert not torch.allclose(first, other, atol=1e-4)
    assert model.base_model.active_beacon_adapter() == "other"
    model.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, first, atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    model.delete_adapter("other")
    assert "other" not in model.base_model.beacon_embedding and "other" not in model.peft_config
    model.load_adapter(tmp_path / "other", adapter_name="again")
    model.set_adapter("again")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, other, atol=0, rtol=0)
    base = model.unload()
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, tiny_model("llama")(input_ids=ids).logits, atol=0,
                                   rtol=0)


def test_gradient_checkpointing_gives_same_gradients():
    ids = random_ids(1, 3 * W + 4)
    grads = []
    for checkpointing in (False, True):
        model = beacon_model("llama").train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_inputs_embeds_path_matches_ids():
    model = beacon_model("qwen2")
    ids = random_ids(1, 2 * W + 3)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_failed_call_leaves_passed_memory_untouched():
    model = beacon_model("llama")
    with torch.no_grad():
        memory = model(input_ids=random_ids(1, W + 3)).past_key_values
        before = memory.sizes(), memory.nbytes()
        with pytest.raises(ValueError, match="rows"):
            model(input_ids=random_ids(2, 4), past_key_values=memory)
        assert (memory.sizes(), memory.nbytes()) == before


def test_ratio_mix_draws_and_override():
    model = beacon_model("llama", ratios=[2, 4], ratio_mix="step-random", ratio_seed=3)
    with torch.no_grad():
        mem_a = model(input_ids=random_ids(1, 6 * W)).past_key_values
    model.base_model.set_compression_ratio(4)
    with torch.no_grad():
        mem_b = model(input_ids=random_ids(1, 6 * W)).past_key_values
    assert set(mem_a.ratios_used) <= {2, 4} and len(mem_a.ratios_used) == 6
    assert mem_b.ratios_used == [4] * 6
    with pytest.raises(ValueError, match="ratio=8"):
        model.base_model.set_compression_ratio(8)


def test_adaptive_ratio_picks_smallest_that_fits():
    # max positions 256, window 16: ratio r fits (256 - 16) * r + 16 tokens
    model = beacon_model("llama", ratios=[2, 4, 8], ratio_mix="adapt", adapt_future_tokens=0, window=16)
    with torch.no_grad():
        short = model(input_ids=random_ids(1, 300)).past_key_values
        long = model(input_ids=random_ids(1, 600)).past_key_values
    assert set(short.ratios_used) == {2} and set(long.ratios_used) == {4}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=0), "window=0"),
        (dict(window=16, ratios=[3]), "ratio 3 does not divide stride 16"),
        (dict(window=16, ratios=[32]), "ratios entry=32"),
        (dict(window=16, stride=8), "placement='append'"),
        (dict(placement="middle"), "placement='middle'"),
        (dict(attention_scope="full-converage"), "attention_scope"),
        (dict(beacon_projections=["q", "x"]), "beacon_projections"),
        (dict(ratio_mix="fixed", ratios=[2, 4]), "exactly one ratio"),
        (dict(sink_size=-1), "sink_size=-1"),
        (dict(embed_init="pad"), "embed_init"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        BeaconConfig(**kwargs)


def test_bad_inputs_raise_before_work():
    model = beacon_model("llama")
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=None)
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=random_ids(1, 8), attention_mask=torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=random_ids(1, 8), output_attentions=True)
    with pytest.raises(ValueError, match="padding"):
        model(input_ids=random_ids(1, 8), attention_mask=torch.zeros(1, 8, dtype=torch.long))


def test_registration_is_importable_and_round_trips_config():
    config = BeaconConfig(window=32, ratios=[2, 4], placement="append", attention_scope="step-expansion")
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING["BEACON"] is BeaconConfig
    assert beacon_peft.BeaconPeftType.BEACON == "BEACON"
    assert isinstance(PeftConfig, type) and config.compresses


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_low_rank_beacon_projections(arch, tmp_path):
    config = BeaconConfig(window=W, ratios=[4], beacon_rank=4)
    model = get_peft_model(tiny_model(arch), config)
    ids = random_ids(1, 3 * W + 2)
    full_copy = get_peft_model(tiny_model(arch), BeaconConfig(window=W, ratios=[4]))
    with torch.no_grad():  # B starts at zero: equal to full copies that are still equal to the base projections
        torch.testing.assert_close(model(input_ids=ids).logits, full_copy(input_ids=ids).logits, atol=1e-5,
                                   rtol=1e-5)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    hidden, kv = 64, 32
    q, k_or_v = 4 * (hidden + hidden), 4 * (hidden + kv)  # rank x (in + out)
    assert sum(trainable.values()) == (q + 2 * k_or_v) + 2 * k_or_v + hidden  # the last layer's q is frozen
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    layer = model.base_model.model.model.layers[0].self_attn
    assert layer.beacon_k["default"].B.weight.grad.abs().sum() > 0
    with torch.no_grad():
        layer.beacon_k["default"].B.weight.normal_(0, 0.1)
        expected = model.eval()(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_compression_ratio_block_forces_the_ratio_and_restores_what_was_before():
    """`BeaconModel.compression_ratio(r)`: the block runs at ratio r (the memory holds N/r beacons), then the ratio
    forced before it (or ratio_mix) is back, also after an exception; a bad ratio is refused before anything."""
    model = get_peft_model(tiny_model("llama"), BeaconConfig(window=16, ratios=[2, 4, 8])).eval()
    tuner, ids = model.base_model, random_ids(1, 64)

    def beacons() -> int:
        with torch.no_grad():
            return model(input_ids=ids).past_key_values.sizes()["comp"]

    tuner.set_compression_ratio(2)
    with tuner.compression_ratio(8):
        assert beacons() == 64 // 8  # every full window is compressed
        with tuner.compression_ratio(4):
            assert beacons() == 64 // 4
        assert beacons() == 64 // 8
    assert beacons() == 64 // 2
    with pytest.raises(RuntimeError, match="inside"), tuner.compression_ratio(8):
        raise RuntimeError("inside")
    assert beacons() == 64 // 2
    with pytest.raises(ValueError, match=r"ratio=3 is not one of this adapter's ratios"), tuner.compression_ratio(3):
        pass
    assert beacons() == 64 // 2
    tuner.set_compression_ratio(None)
    with tuner.compression_ratio(4):
        assert beacons() == 64 // 4
    assert tuner._pickers["default"].override is None
