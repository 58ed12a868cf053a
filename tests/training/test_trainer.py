"""Training runs of recipes/train.py in-process on a tiny random Llama (a few optimizer steps each): the loss
falls, only beacon parameters change, the saved adapter reloads bitwise, the model card, reproducible ratio
sequences, resume, atomic saves, time limit, finetuning, a 4-bit base, LoRA on the base, a second stage from a
trained adapter, low-rank beacons, the held-out comparison; importing the library does not import TRL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_recipe import W, base_args, base_model, eval_loss, run_script, sequences

from beacon_peft import BeaconConfig, training


@pytest.fixture(scope="module")
def trained(model_dir, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer = run_script(base_args(model_dir, text_dir, out, "--max_steps", "24", "--ratio_mix", "step"))
    return trainer, out


def test_training_reduces_the_loss(trained, model_dir, text_dir):
    trainer, _ = trained
    seqs = sequences(model_dir, text_dir)
    fresh = get_peft_model(base_model(model_dir), trainer.model.peft_config["default"].__class__(
        **{**trainer.model.peft_config["default"].to_dict(), "inference_mode": False}))
    for ratio in (4, 8):
        before, after = eval_loss(fresh, seqs, ratio), eval_loss(trainer.model, seqs, ratio)
        assert after < before - 0.2, (ratio, before, after)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 24 and sum(losses[-6:]) < sum(losses[:6])


def test_only_beacon_parameters_change_bitwise(trained, model_dir):
    trainer, _ = trained
    reference = base_model(model_dir).state_dict()
    beacons = 0
    for name, tensor in trainer.model.state_dict().items():
        if "beacon_" in name:
            beacons += 1
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(tensor, reference[key]), name
    # every beacon projection starts as a copy of its base projection; the trained ones differ
    model = trainer.model.base_model.model
    for layer in model.model.layers:
        attn = layer.self_attn
        for p in ("k", "v"):
            trained_w = getattr(attn, f"beacon_{p}")["default"].weight
            assert not torch.equal(trained_w, getattr(attn.base_layer, f"{p}_proj").weight), (layer, p)
    assert beacons > 0
    assert all("beacon_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    # the last layer's beacon query never reaches the loss: frozen, and still the copy of the base query
    last = model.model.layers[-1].self_attn
    assert not last.beacon_q["default"].weight.requires_grad
    assert torch.equal(last.beacon_q["default"].weight, last.base_layer.q_proj.weight)


def test_saved_adapter_reloads_with_the_same_outputs(trained, model_dir, text_dir):
    trainer, out = trained
    final = out / "final"
    assert sorted(p.name for p in final.iterdir()) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json",
         "tokenizer_config.json", "training_log.json"])
    assert not [p for p in out.iterdir() if p.name.startswith(".final")]  # no temporary folder left
    saved = load_file(final / "adapter_model.safetensors")
    assert saved and all("beacon_" in k for k in saved)
    reloaded = PeftModel.from_pretrained(base_model(model_dir), final).eval()
    ids = torch.tensor([sequences(model_dir, text_dir)[0]])
    model = trainer.model.eval()
    for ratio in (2, 8):
        with torch.no_grad(), model.base_model.compression_ratio(ratio), reloaded.base_model.compression_ratio(ratio):
            torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_model_card_names_base_settings_data_and_figures(trained, model_dir, text_dir):
    trainer, out = trained
    card = (out / "final" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert str(model_dir) in card
    assert "| window / stride | 32 / 32 |" in card and "| compression ratios | [2, 4, 8] |" in card
    assert f"dataset: `{text_dir}`" in card and "training sequences: 12" in card
    tokens = trainer.state.num_input_tokens_seen
    assert tokens > 0 and f"| tokens seen (non-padding) | {tokens:,} |" in card
    assert "| optimizer steps | 24 " in card and "wall time of train()" in card and "hardware | CPU" in card
    final_loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    assert f"| final logged training loss | {final_loss:.4f} |" in card
    assert "python recipes/train.py --model_name_or_path" in card


def test_step_ratio_sequence_is_reproducible_from_the_seed(trained, model_dir, text_dir, tmp_path):
    trainer, _ = trained
    logged = [int(h["compression_ratio"]) for h in trainer.state.log_history if "compression_ratio" in h]
    assert logged == [training.step_ratio(0, k, [2, 4, 8]) for k in range(24)]
    assert set(logged) == {2, 4, 8}
    # every window of a step used that step's ratio
    assert all(r == training.step_ratio(0, step, [2, 4, 8]) for step, r in trainer.ratio_history)
    again = run_script(base_args(model_dir, text_dir, tmp_path / "a", "--max_steps", "6", "--ratio_mix", "step"))
    other = run_script(base_args(model_dir, text_dir, tmp_path / "b", "--max_steps", "6", "--ratio_mix", "step",
                                 "--ratio_seed", "7"))
    def ratios(t):
        return [int(h["compression_ratio"]) for h in t.state.log_history if "compression_ratio" in h]

    assert ratios(again) == logged[:6]
    assert ratios(other) == [training.step_ratio(7, k, [2, 4, 8]) for k in range(6)] != logged[:6]


def test_ratios_of_every_micro_batch_are_recorded_under_gradient_accumulation(model_dir, text_dir, tmp_path):
    trainer = run_script(base_args(model_dir, text_dir, tmp_path, "--max_steps", "2", "--ratio_mix", "step",
                                   "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "1",
                                   "--min_length", "97"))
    history = trainer.ratio_history
    assert all(r == training.step_ratio(0, step, [2, 4, 8]) for step, r in history)
    # each micro-batch is one sequence of 97-128 tokens, which takes the same number of window steps k
    model = trainer.model.train()
    with torch.no_grad():
        per_sequence = set()
        for n in (97, 128):
            model(input_ids=torch.full((1, n), 7))
            per_sequence.add(len(model.base_model.ratios_last_call()))
    (k,) = per_sequence
    assert [step for step, _ in history] == [0] * 2 * k + [1] * 2 * k  # both micro-batches of both steps
    logged = [h["compression_ratio"] for h in trainer.state.log_history if "compression_ratio" in h]
    assert logged == [training.step_ratio(0, k, [2, 4, 8]) for k in range(2)]


def test_window_ratio_sequence_is_reproducible_from_the_seed(model_dir, text_dir, tmp_path):
    runs = [run_script(base_args(model_dir, text_dir, tmp_path / str(i), "--max_steps", "4", "--ratio_mix",
                                 "window", "--seed", str(seed))) for i, seed in enumerate((3, 3, 4))]
    histories = [r.ratio_history for r in runs]
    assert histories[0] == histories[1] and histories[0] != histories[2]
    assert len({r for _, r in histories[0]}) > 1  # drawn per window, not one ratio per step
    a, b = (load_file(r.final_dir / "adapter_model.safetensors") for r in runs[:2])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("ratio_mix", ["window", "sequence", "step"])
def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(ratio_mix, model_dir, text_dir, tmp_path):
    args = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--ratio_mix", ratio_mix]
    full = run_script(base_args(model_dir, text_dir, tmp_path / "full", *args))
    # an interrupted run leaves checkpoint-3 (and no final adapter); resume it in a fresh output folder
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", interrupted / "checkpoint-3")
    resumed = run_script(base_args(model_dir, text_dir, interrupted, *args, "--resume_from_checkpoint", "true"))
    assert resumed.state.global_step == 6
    a = load_file(full.final_dir / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [x for x in full.ratio_history if x[0] >= 3] == resumed.ratio_history
    card = (resumed.final_dir / "README.md").read_text()
    assert "resumed from" in card and "checkpoint-3" in card


def test_a_fresh_run_into_an_earlier_runs_folder_is_refused(trained, model_dir, text_dir, tmp_path, monkeypatch):
    """A run without --resume_from_checkpoint into an output_dir holding checkpoint-* folders or a final adapter is
    refused before anything is loaded (the Trainer would write over them, or rotate them away); listing and bytes
    unchanged. --overwrite_output_dir true replaces the final adapter."""
    import beacon_peft.training.trainer as trainer_module

    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    shutil.copytree(trained[0].final_dir, out / "final")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(trainer_module, "load_tokenizer", lambda *a: pytest.fail("loaded before refusing"))
    with pytest.raises(ValueError, match=r"output_dir=.*run holds an earlier run \(checkpoint-3, .*final\): allowed "
                                         "--resume_from_checkpoint to continue it, --overwrite_output_dir true"):
        run_script(base_args(model_dir, text_dir, out, "--max_steps", "1"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    shutil.rmtree(out / "checkpoint-3")
    redone = run_script(base_args(model_dir, text_dir, out, "--max_steps", "1", "--overwrite_output_dir", "true"))
    assert redone.state.global_step == 1 and (out / "final" / "adapter_model.safetensors").is_file()


def test_final_adapter_is_written_atomically(tmp_path):
    """`saving.save_final` writes through `atomic.write_dir(..., overwrite=True)`."""
    from beacon_peft.atomic import write_dir

    final = tmp_path / "final"

    def good(folder):
        (folder / "adapter_model.safetensors").write_text("v1")

    write_dir(final, good, overwrite=True)
    assert (final / "adapter_model.safetensors").read_text() == "v1"

    def interrupted(folder):
        (folder / "adapter_model.safetensors").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir(final, interrupted, overwrite=True)
    assert (final / "adapter_model.safetensors").read_text() == "v1"  # the previous adapter is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary folder left
    write_dir(final, lambda f: (f / "adapter_model.safetensors").write_text("v2"), overwrite=True)
    assert (final / "adapter_model.safetensors").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_time_limit_stops_training_and_still_saves(model_dir, text_dir, tmp_path):
    trainer = run_script(base_args(model_dir, text_dir, tmp_path, "--max_steps", "1000", "--max_train_minutes", "1e-6"))
    assert trainer.state.global_step == 1 and (trainer.final_dir / "adapter_model.safetensors").is_file()


def test_finetune_stage_trains_on_chat_data(model_dir, chat_file, tmp_path):
    trainer = run_script(base_args(model_dir, chat_file, tmp_path, "--stage", "finetune", "--max_length", "256",
                                   "--max_steps", "3", "--sink_size", "1", "--attention_scope", "step-expansion",
                                   "--beacon_projections", "q", "k", "v", "o"))
    config = json.loads((trainer.final_dir / "adapter_config.json").read_text())
    assert config["attention_scope"] == "step-expansion" and config["beacon_projections"] == ["q", "k", "v", "o"]
    assert trainer.state.global_step == 3 and "stage `finetune`" in (trainer.final_dir / "README.md").read_text()


@pytest.mark.parametrize("upcast", [True, False], ids=["fp32-unquantized", "bf16-unquantized"])
def test_4bit_base_with_gradient_checkpointing(upcast, model_dir, text_dir, tmp_path):
    extra = [] if upcast else ["--upcast_unquantized", "false", "--dtype", "bfloat16"]
    trainer = run_script(base_args(model_dir, text_dir, tmp_path, "--max_steps", "2", "--load_in_4bit", "true",
                                   "--activation_checkpointing", "true", "--attn_implementation", "sdpa", *extra))
    model = trainer.model
    embed = model.get_base_model().get_input_embeddings().weight
    assert embed.dtype == (torch.float32 if upcast else torch.bfloat16)  # the residual stream's dtype
    layer = model.base_model.model.model.layers[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords["use_reentrant"] is False
    q_proj = layer.self_attn.base_layer.q_proj
    assert type(q_proj.weight).__name__ == "Params4bit"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("beacon_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    assert "4-bit nf4 base" in (trainer.final_dir / "README.md").read_text()
    # the saved adapter loads onto a 4-bit base
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    PeftModel.from_pretrained(base, trainer.final_dir)


def test_lora_on_the_base_trains_saves_and_resumes(model_dir, text_dir, tmp_path):
    args = ["--max_steps", "4", "--use_lora", "true", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
            "--save_strategy", "steps", "--save_steps", "2"]
    trainer = run_script(base_args(model_dir, text_dir, tmp_path / "full", *args))
    model = trainer.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".lora_B." in n for n in names) and any("beacon_" in n for n in names)
    assert not model.base_model.model.model.layers[-1].self_attn.beacon_q["default"].weight.requires_grad
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: it was trained
    final = trainer.final_dir
    assert (final / "base_lora" / "adapter_config.json").is_file()
    assert (tmp_path / "full" / "checkpoint-2" / "base_lora.safetensors").is_file()
    # reload: base + merged LoRA + beacon adapter gives the trained model's outputs
    reloaded = training.load_trained(final, base_model=base_model(model_dir)).eval()
    ids = torch.tensor([sequences(model_dir, text_dir)[0]])
    model.eval().base_model.set_compression_ratio(4)
    reloaded.base_model.set_compression_ratio(4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5,
                                   rtol=1e-5)
    # resume from checkpoint-2 restores the LoRA as well
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", interrupted / "checkpoint-2")
    resumed = run_script(base_args(model_dir, text_dir, interrupted, *args, "--resume_from_checkpoint", "true"))
    for sub, name in (("", "adapter_model.safetensors"), ("base_lora", "adapter_model.safetensors")):
        a, b = load_file(final / sub / name), load_file(resumed.final_dir / sub / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_init_adapter_continues_from_a_trained_adapter(trained, model_dir, chat_file, tmp_path):
    trainer, out = trained
    follow = run_script(base_args(model_dir, chat_file, tmp_path, "--stage", "finetune", "--max_length", "256",
                                  "--max_steps", "1", "--learning_rate", "1e-12", "--ratios", "2", "4",
                                  "--init_adapter", str(out / "final")))
    a = load_file(out / "final" / "adapter_model.safetensors")
    b = load_file(follow.final_dir / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((follow.final_dir / "adapter_config.json").read_text())["ratios"] == [2, 4]
    # one card tells both stages: this run's figures, then the first stage's card and the totals
    card = (follow.final_dir / "README.md").read_text()
    first = (out / "final" / "README.md").read_text()
    assert f"started from the beacon weights of `{out / 'final'}`" in card
    assert "### Training" in card and card.count("| optimizer steps |") == 2
    seen = [int(x.replace(",", "")) for x in re.findall(r"\| tokens seen \(non-padding\) \| ([\d,]+) \|", card)]
    assert len(seen) == 2 and f"Both stages together: {sum(seen):,} tokens seen" in card
    assert first[first.index("## Data"):].replace("## ", "### ").splitlines()[0] in card


def test_low_rank_beacons_train_only_their_deltas_and_the_embedding(model_dir, text_dir, tmp_path):
    from transformers import set_seed

    from beacon_peft.layer import LowRankDelta

    trainer = run_script(base_args(model_dir, text_dir, tmp_path, "--max_steps", "3", "--beacon_rank", "4"))
    model = trainer.model
    config = model.peft_config["default"]
    assert config.beacon_rank == 4
    assert json.loads((trainer.final_dir / "adapter_config.json").read_text())["beacon_rank"] == 4
    # the untrained adapter, rebuilt from the run's seed: deltas B @ A with B = 0, embedding = the eos embedding
    set_seed(0)
    initial = get_peft_model(base_model(model_dir), BeaconConfig(**{
        k: v for k, v in config.to_dict().items() if k not in ("peft_type", "inference_mode")}))
    before = dict(initial.named_parameters())
    reference = base_model(model_dir).state_dict()
    changed = set()
    for name, param in model.named_parameters():
        if not torch.equal(param, before[name].to(param.dtype)):
            changed.add(name)
        elif "beacon_" not in name:  # a base weight: also bitwise the base model's
            assert torch.equal(param, reference[name.removeprefix("base_model.model.").replace(".base_layer.", ".")])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = model.base_model.model.model.layers
    expected = {"base_model.beacon_embedding.default"}
    for i, layer in enumerate(layers):
        for p in ("q", "k", "v"):
            delta = getattr(layer.self_attn, f"beacon_{p}")["default"]
            assert isinstance(delta, LowRankDelta) and delta.A.weight.shape == (4, 64)
            if i == len(layers) - 1 and p == "q":  # never reaches the loss: frozen, B still zero
                assert not delta.A.weight.requires_grad and not delta.B.weight.requires_grad
                assert not delta.B.weight.any()
                continue
            prefix = f"base_model.model.model.layers.{i}.self_attn.beacon_{p}.default"
            expected |= {f"{prefix}.A.weight", f"{prefix}.B.weight"}
    assert trainable == expected and changed == expected
    saved = load_file(trainer.final_dir / "adapter_model.safetensors")  # per layer: rank-4 q (64x64), k/v (32x64)
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for n, p in model.named_parameters()
                                                          if "beacon_" in n) == 2 * (8 * 64 + 2 * 4 * (64 + 32)) + 64
    reloaded = PeftModel.from_pretrained(base_model(model_dir), trainer.final_dir).eval()
    ids = torch.tensor([sequences(model_dir, text_dir)[0]])
    model.eval().base_model.set_compression_ratio(4)
    reloaded.base_model.set_compression_ratio(4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_heldout_evaluation_compares_base_untrained_and_trained(trained):
    from beacon_peft.offline import corpora

    try:
        corpora.essay_split()
    except RuntimeError as err:
        pytest.skip(str(err))
    _, out = trained
    lines = []
    results = training.compare_heldout(str(out / "final"), [4], n_sequences=1, length=96, report=lines.append)
    assert list(results["models"]) == ["base (full attention, no compression)", "untrained adapter, ratio 4",
                                       "trained adapter, ratio 4"]
    assert len(lines) == 3 and all(r["tokens_after_first_window"] == 95 - W for r in results["models"].values())


def test_importing_the_library_does_not_import_trl():
    code = ("import sys, beacon_peft, beacon_peft.training as t; t.BeaconCollator, t.step_ratio, t.load_trained, "
            "t.adapter_footprint; assert 'trl' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
