"""Compress once, ask many (tiny Llama / Mistral / Qwen2 / Qwen3): forks, saved memories, what generate() does to
a passed memory, and bad files / foreign models."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from tiny import ARCHS, perturb_beacons, random_ids, tiny_model

import beacon_peft
from beacon_peft import BeaconConfig, BeaconMemory
from beacon_peft.reuse import ask, cache_kwargs, read

W = 16
GEN = dict(max_new_tokens=W + 3, do_sample=False, pad_token_id=0, eos_token_id=None)


def beacon_model(arch="llama", seed=0, beacon_seed=1, model_kw=None, **kw):
    config = BeaconConfig(window=kw.pop("window", W), ratios=kw.pop("ratios", [4]), sink_size=kw.pop("sink_size", 1),
                          **kw)
    model = get_peft_model(tiny_model(arch, seed, **(model_kw or {})), config)
    perturb_beacons(model, seed=beacon_seed)
    return model.eval()


def padded(rows):
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, longest - len(row):] = row
        mask[b, longest - len(row):] = 1
    return ids, mask


def doc_and_question(case):
    """(doc ids, doc mask, question ids) of a case; question rows are unpadded."""
    if case == "left-padded":
        doc, mask = padded([random_ids(1, n, seed=i)[0] for i, n in enumerate([3 * W + 5, 2 * W - 3, W + 1])])
        return doc, mask, random_ids(3, 9, seed=7)
    doc = random_ids(1, 3 * W + 5)
    q_len = 7 if case == "inside" else W + 3  # open window: 5 + 7 < W tokens, or crossing its end
    return doc, None, random_ids(1, q_len, seed=7)


SETTINGS = {"interleave": {}, "append": dict(placement="append", stride=W // 2, window=W)}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("case", ["inside", "crossing", "left-padded"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_saved_memory_continues_exactly(arch, case, setting, tmp_path):
    """A memory saved and loaded continues as one call over document + continuation: logits and greedy ids."""
    model = beacon_model(arch, **SETTINGS[setting])
    doc, mask, q = doc_and_question(case)
    full_mask = None if mask is None else torch.cat((mask, torch.ones_like(q)), 1)
    with torch.no_grad():
        whole = model(input_ids=torch.cat((doc, q), 1), attention_mask=full_mask).logits[:, -q.shape[1]:]
        memory = read(model, doc, attention_mask=mask, piece_windows=1)
        memory.save(tmp_path / "mem", model)
        loaded = BeaconMemory.load(tmp_path / "mem", model)
        assert loaded.num_entries() == memory.num_entries() and loaded.get_seq_length() == doc.shape[1]
        cont = model(input_ids=q, **cache_kwargs(model, loaded)).logits
    torch.testing.assert_close(cont, whole, atol=2e-5, rtol=1e-5)
    expected = model.generate(input_ids=torch.cat((doc, q), 1), attention_mask=full_mask, **GEN)
    expected = expected[:, doc.shape[1] + q.shape[1]:]
    reloaded = BeaconMemory.load(tmp_path / "mem", model)
    assert ask(model, reloaded, q, **GEN).tolist() == expected.tolist()
    assert ask(model, memory, q, **GEN).tolist() == expected.tolist()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_forks_answer_independently(arch):
    model = beacon_model(arch)
    doc, _, q_a = doc_and_question("crossing")
    q_b = random_ids(1, 5, seed=11)
    with torch.no_grad():
        memory = read(model, doc)
    tensors = memory.kv_tensors()
    columns, entries = memory.get_seq_length(), memory.num_entries()
    b_alone = ask(model, read(model, doc), q_b, **GEN)
    fork_a, fork_b = memory.copy(), memory.copy()
    assert all(x is y for x, y in zip(fork_a.kv_tensors(), tensors))  # a fork shares the K/V tensors
    a_answer, a_branch = ask(model, fork_a, q_a, return_memory=True, **GEN)
    assert ask(model, fork_b, q_b, **GEN).tolist() == b_alone.tolist()  # A's question did not reach fork B
    assert ask(model, memory, q_a, **GEN).tolist() == a_answer.tolist()
    # nothing was written into the memory nor the forks: same tensors, same bookkeeping
    assert all(x is y for x, y in zip(memory.kv_tensors(), tensors))
    assert memory.get_seq_length() == fork_a.get_seq_length() == columns and memory.num_entries() == entries
    assert a_branch.get_seq_length() == columns + q_a.shape[1] + GEN["max_new_tokens"] - 1


def test_ask_with_beams_or_several_sequences_equals_generate_over_the_whole_input():
    """generate() repeats the question's rows for beams and returned sequences but not the memory's: `ask` expands
    its fork, so beam search and sampled sequences equal generate() over document + question (the memory keeps its
    one row). A bad count is refused before generating; generate() handed the memory directly names the fix."""
    model = beacon_model()
    doc, _, q = doc_and_question("inside")
    memory = read(model, doc)
    whole = torch.cat((doc, q), 1)
    for kwargs in (dict(num_beams=3), dict(num_beams=3, num_return_sequences=2)):
        got = ask(model, memory, q, **GEN, **kwargs)
        want = model.generate(input_ids=whole, **GEN, **kwargs)[:, whole.shape[1]:]
        assert got.shape[0] == kwargs.get("num_return_sequences", 1) and torch.equal(got, want)
    torch.manual_seed(0)
    got = ask(model, memory, q, max_new_tokens=4, do_sample=True, num_return_sequences=3, pad_token_id=0)
    torch.manual_seed(0)
    want = model.generate(input_ids=whole, max_new_tokens=4, do_sample=True, num_return_sequences=3, pad_token_id=0)
    assert got.shape[0] == 3 and torch.equal(got, want[:, whole.shape[1]:])
    assert memory.batch_size == 1
    with pytest.raises(ValueError, match="num_beams=0 is not allowed: an int >= 1"):
        ask(model, memory, q, num_beams=0)
    with pytest.raises(ValueError, match="repeats the input's rows but not a memory's: use beacon_peft.reuse.ask"):
        model.generate(input_ids=q, attention_mask=torch.ones(1, memory.get_seq_length() + q.shape[1],
                                                              dtype=torch.long),
                       past_key_values=memory.copy(), num_beams=2, max_new_tokens=2)


def test_read_and_ask_refuse_a_model_without_a_beacon_adapter():
    from peft import LoraConfig

    memory = read(beacon_model(), random_ids(1, 20))
    for other in (tiny_model(), get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"]))):
        with pytest.raises(TypeError, match="model must be a PEFT model with a beacon adapter"):
            read(other, random_ids(1, 20))
        with pytest.raises(TypeError, match="model must be a PEFT model with a beacon adapter"):
            ask(other, memory, random_ids(1, 3))


def test_second_names_are_deprecated():
    """`reuse.fork` (a second name for `BeaconMemory.copy`) still forks and ``layer_kv(part="beacon")`` (for
    ``"comp"``) still reads, each with a FutureWarning naming the one name."""
    from beacon_peft.reuse import fork

    memory = read(beacon_model(), doc_and_question("inside")[0])
    with pytest.warns(FutureWarning, match=r"use memory\.copy\(\)"):
        forked = fork(memory)
    assert forked is not memory and all(x is y for x, y in zip(forked.kv_tensors(), memory.kv_tensors()))
    assert forked.get_seq_length() == memory.get_seq_length()
    with pytest.raises(TypeError, match="BeaconMemory"):
        fork([memory])
    with pytest.warns(FutureWarning, match="part 'comp'"):  # the compressed memory's second name, also deprecated
        old = memory.layer_kv(0, "beacon")
    new = memory.layer_kv(0, "comp")
    assert new[0].numel() and all(torch.equal(a, b) for a, b in zip(old, new))


def test_generate_consumes_a_passed_memory():
    """generate() commits every step into the memory object it is handed (question + answer but its last token)."""
    model = beacon_model()
    doc, _, q = doc_and_question("inside")
    memory = read(model, doc)
    before = memory.get_seq_length()
    fork = memory.copy()
    mask = torch.ones(1, before + q.shape[1], dtype=torch.long)
    gen = model.generate(input_ids=q, attention_mask=mask, **cache_kwargs(model, fork), **GEN)
    assert gen.shape[1] == q.shape[1] + GEN["max_new_tokens"]
    assert fork.get_seq_length() == before + q.shape[1] + GEN["max_new_tokens"] - 1  # consumed
    assert memory.get_seq_length() == before  # the original was never handed over
    # the whole sequence so far as input_ids (generate slices it by the memory's length) gives the same answer
    again = model.generate(input_ids=torch.cat((doc, q), 1), **cache_kwargs(model, memory.copy()), **GEN)
    assert again[:, doc.shape[1]:].tolist() == gen.tolist()
    # the question alone without a mask covering the memory: generate feeds nothing, and the error says why
    with pytest.raises(ValueError, match="attention_mask covering memory"):
        model.generate(input_ids=q, **cache_kwargs(model, memory.copy()), **GEN)


def test_bf16_storage_halves_the_file_and_stays_close(tmp_path):
    model = beacon_model()
    doc, _, q = doc_and_question("crossing")
    with torch.no_grad():
        memory = read(model, doc)
        memory.save(tmp_path / "fp32", model)
        memory.save(tmp_path / "bf16", model, dtype=torch.bfloat16)
        a = model(input_ids=q, **cache_kwargs(model, BeaconMemory.load(tmp_path / "fp32", model))).logits
        b = model(input_ids=q, **cache_kwargs(model, BeaconMemory.load(tmp_path / "bf16", model))).logits
    size = {d: (tmp_path / d / "memory.safetensors").stat().st_size for d in ("fp32", "bf16")}
    assert size["bf16"] < 0.6 * size["fp32"]
    assert json.loads((tmp_path / "bf16" / "memory.json").read_text())["storage_dtype"] == "bfloat16"
    assert 0 < (a - b).abs().max() < 0.05
    assert BeaconMemory.load(tmp_path / "bf16", model).kv_tensors()[0].dtype == torch.float32  # back to compute dtype


@pytest.mark.parametrize("other, match", [
    (dict(seed=5), "base.weights"),
    (dict(beacon_seed=9), "adapter.weights"),
    (dict(window=8), "signature.window"),
    (dict(ratios=[2]), "signature.ratios"),
    (dict(model_kw=dict(num_hidden_layers=3)), "signature.num_layers"),
])
def test_load_refuses_another_model_or_setting(tmp_path, other, match):
    model = beacon_model()
    memory = read(model, random_ids(1, 2 * W + 3))
    memory.save(tmp_path / "m", model)
    with pytest.raises(ValueError, match=match):
        BeaconMemory.load(tmp_path / "m", beacon_model(**other))


def test_load_refuses_another_forced_ratio_or_dtype(tmp_path):
    model = beacon_model(ratios=[2, 4], ratio_mix="step-random")
    model.base_model.set_compression_ratio(4)
    read(model, random_ids(1, 2 * W + 3)).save(tmp_path / "m", model)
    model.base_model.set_compression_ratio(2)
    with pytest.raises(ValueError, match=r"forced compression ratio: memory 4 vs model 2.*set_compression_ratio\(4\)"):
        BeaconMemory.load(tmp_path / "m", model)
    model.base_model.set_compression_ratio(4)
    BeaconMemory.load(tmp_path / "m", model)
    with pytest.raises(ValueError, match="compute dtype: memory float32 vs model bfloat16"):
        BeaconMemory.load(tmp_path / "m", model.to(torch.bfloat16))


def test_bad_files_are_clear_errors(tmp_path):
    model = beacon_model()
    memory = read(model, random_ids(1, 2 * W + 3))
    with pytest.raises(FileNotFoundError, match="no saved memory"):
        BeaconMemory.load(tmp_path / "missing", model)
    memory.save(tmp_path / "m", model)
    tensors = tmp_path / "m" / "memory.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        BeaconMemory.load(tmp_path / "m", model)
    memory.save(tmp_path / "m", model)  # overwriting a saved memory is allowed
    BeaconMemory.load(tmp_path / "m", model)
    meta = tmp_path / "m" / "memory.json"
    meta.write_text(meta.read_text()[:100])
    with pytest.raises(ValueError, match="memory.json is corrupt or truncated"):
        BeaconMemory.load(tmp_path / "m", model)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty folder that is not a saved memory"):
        memory.save(other, model)
    assert (other / "keep.txt").read_text() == "mine" and sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    with pytest.raises(ValueError, match="not a storage dtype"):
        memory.save(tmp_path / "x", model, dtype=torch.int8)
    with pytest.raises(ValueError, match="not a saved memory"):
        BeaconMemory.load(other, model)


def test_a_failed_save_keeps_the_previous_memory(tmp_path, monkeypatch):
    import beacon_peft.memory_file as memory_file

    model = beacon_model()
    first = read(model, random_ids(1, 2 * W + 3))
    first.save(tmp_path / "m", model)
    good = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(memory_file, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        read(model, random_ids(1, 3 * W)).save(tmp_path / "m", model)
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind
    BeaconMemory.load(tmp_path / "m", model)


def test_bad_arguments():
    model = beacon_model()
    memory = read(model, random_ids(1, 2 * W))
    with pytest.raises(TypeError, match="must be a BeaconMemory"):
        ask(model, None, random_ids(1, 3))
    with pytest.raises(ValueError, match="at least one token"):
        ask(model, memory, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="2 rows but the memory holds 1"):
        ask(model, memory, random_ids(2, 3))
    with pytest.raises(TypeError, match="do not pass"):
        ask(model, memory, random_ids(1, 3), **cache_kwargs(model, memory))
    with pytest.raises(ValueError, match="piece_windows=0"):
        read(model, random_ids(1, 3), piece_windows=0)
    with pytest.raises(TypeError, match="PEFT model"):
        memory.save("unused", torch.nn.Linear(2, 2))
    assert beacon_peft.BeaconMemory is BeaconMemory
