"""`beacon-peft ask` / `chat` serve any model: a tiny random Llama and a beacon adapter saved to folders.

`--model DIR --adapter DIR` answers as the library does over the same model; the default `--model` is the
adapter's base_model_name_or_path; a base the adapter does not fit is refused (exit 2, naming the field) from its
config alone, before any weight is loaded or the document read; bad devices and an impossible 4-bit load are
refused before loading; `--load-in-4bit` runs on the CPU; an adapter given by Hub id (and a base named by Hub id)
loads from a local Hub server (tests/hub_server.py), as `AutoPeftModelForCausalLM` does."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import OPENED_ARCHS, perturb_beacons, perturb_norms, tiny_auto, tiny_model

import beacon_peft.loading as loading
from beacon_peft import BeaconConfig
from beacon_peft.reuse_cli import main

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma omega red green blue "
         "river stone cloud light north south east west one two three four five six seven eight nine ten").split()
QUESTION = "what is the code ?"
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None


def word_tokenizer():
    """A word-level tokenizer whose ids fit the tiny models' vocabulary of 128 (pad 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "what", "is", "the", "code", "?", "."]
                                        + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_pair(root: Path, **overrides) -> tuple[Path, Path]:
    """A tiny Llama (with tokenizer) in ``root/base`` and a perturbed beacon adapter of it in ``root/adapter``."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    tiny_model("llama", **overrides).save_pretrained(root / "base")
    word_tokenizer().save_pretrained(root / "base")
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), BeaconConfig(window=16, ratios=[4, 8]))
    perturb_beacons(peft)
    peft.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> Path:
    words = [WORDS[(7 * i) % len(WORDS)] for i in range(150)]
    words[60:64] = ["the", "code", "is", "omega"]
    path = tmp_path_factory.mktemp("doc") / "doc.txt"
    path.write_text(" ".join(words) + " .\n")
    return path


def answers(out: str) -> list[str]:
    return [line.split(": ", 1)[1] if ": " in line else "" for line in out.splitlines()
            if line[:1] == "A" and line[1:2].isdigit()]


def library_answer(base: Path, adapter: Path, text: str, ratio: int, tokens: int = 4) -> str:
    """The answer `beacon_peft.reuse` gives over the same model, read and asked by hand."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from beacon_peft.chat import PLAIN_TURN
    from beacon_peft.reuse import ask, read

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      adapter).eval()  # transformers' default attention, as the commands load it
    model.base_model.set_compression_ratio(ratio)
    with torch.no_grad():
        memory = read(model, torch.tensor([tokenizer.encode(text, add_special_tokens=False)]))
        prompt = torch.tensor([tokenizer.encode(PLAIN_TURN.format(question=QUESTION), add_special_tokens=False)])
        answer = ask(model, memory, prompt, max_new_tokens=tokens, do_sample=False,
                     pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(answer[0], skip_special_tokens=True).strip()


def never_read_or_loaded(monkeypatch) -> None:
    """Make reading the document or loading any weights fail the test."""
    import transformers

    from beacon_peft import reuse_cli

    def refuse(*args, **kwargs):
        raise AssertionError("the document was read or weights were loaded before the refusal")

    monkeypatch.setattr(reuse_cli, "_read_document", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_ask_with_model_and_adapter_folders_answers_as_the_library(pair, document, tmp_path, capsys):
    base, adapter = pair
    mem = tmp_path / "mem"
    args = ["-q", QUESTION, "--adapter", str(adapter), "--ratio", "4", "--max-new-tokens", "4", "--device", "cpu"]
    assert main("ask", [str(document), "--model", str(base), "--save-memory", str(mem), *args]) == 0
    out, err = capsys.readouterr()
    assert "read " in out and "KV held:" in out and f"loaded {base} with adapter {adapter} on cpu, float32" in err
    expected = library_answer(base, adapter, document.read_text(), ratio=4)
    assert answers(out) == [expected]
    assert torch.is_grad_enabled()  # the command's no_grad did not leak

    # the default --model is the adapter's base_model_name_or_path (the folder it was made on)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert main("ask", ["--memory", str(mem), *args]) == 0
    out, err = capsys.readouterr()
    assert "loaded memory" in out and f"loaded {base} with" in err and answers(out) == [expected]


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt_oss", "phi3", "gpt_neox", "smollm3"])
def test_ask_serves_the_decoders_opened_by_the_general_mechanisms(model_type, document, tmp_path, capsys):
    """RoPE per layer type, sinks (eager: gpt-oss has no sdpa), fused q/k/v, NoPE layers: `ask` answers as the
    library does over the same folders."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    perturb_norms(tiny_auto(model_type, **OPENED_ARCHS[model_type])).save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), BeaconConfig(window=16, ratios=[4]))
    perturb_beacons(peft)
    peft.save_pretrained(adapter)
    args = ["-q", QUESTION, "--adapter", str(adapter), "--ratio", "4", "--max-new-tokens", "4", "--device", "cpu"]
    assert main("ask", [str(document), "--model", str(base), *args]) == 0
    out, _ = capsys.readouterr()
    assert answers(out) == [library_answer(base, adapter, document.read_text(), ratio=4)]


def test_chat_in_a_pipe_with_an_adapter_folder(pair, document):
    """The console entry point end to end (a subprocess), `chat` with the model taken from the adapter."""
    _, adapter = pair
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "beacon_peft.cli", "chat", str(document), "--adapter", str(adapter),
                             "--ratio", "8", "--max-new-tokens", "3", "--device", "auto"], input=f"{QUESTION}\n/quit\n",
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant:") == 1 and "KV held:" in result.stdout


@pytest.mark.parametrize("arch, overrides, message", [
    ("llama", dict(hidden_size=32), "hidden_size: adapter 64 vs model 32"),
    ("llama", dict(num_hidden_layers=3), "num_hidden_layers: adapter 2 (beacon projections in every layer) vs model 3"),
    ("llama", dict(num_key_value_heads=4), "num_key_value_heads x head_dim: adapter 32 (beacon k/v projection rows) vs "
     "model 4 x 16 = 64"),
    ("llama", dict(head_dim=32), "num_attention_heads x head_dim: adapter 64 (beacon q projection rows) vs model "
     "4 x 32 = 128"),
    ("qwen2", {}, "this model's projections have biases (e.g. Qwen2) but the adapter has none"),
    ("mistral", {}, "model_type 'mistral' vs 'llama' of the adapter's base"),
])
def test_a_base_the_adapter_does_not_fit_is_refused_from_its_config(pair, document, tmp_path, capsys, monkeypatch,
                                                                   arch, overrides, message):
    """Only the other base's config.json is on disk: the refusal needs no weights, and nothing is read."""
    from tiny import ARCHS

    _, adapter = pair
    config = ARCHS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    config.save_pretrained(tmp_path / "other")
    never_read_or_loaded(monkeypatch)
    code = main("ask", [str(document), "-q", QUESTION, "--model", str(tmp_path / "other"), "--adapter", str(adapter)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.startswith("beacon-peft ask: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("device, message", [
    ("tpu", "--device tpu: not a device; use one of ['auto', 'cpu', 'cuda', 'cuda:N', 'mps']"),
    ("cuda:7", "--device cuda:7: not available here; this machine has"),
    ("mps", "--device mps: not available here; this machine has"),
])
def test_a_bad_or_absent_device_is_refused_before_loading(pair, document, capsys, monkeypatch, device, message):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    _, adapter = pair
    never_read_or_loaded(monkeypatch)
    assert main("ask", [str(document), "-q", QUESTION, "--adapter", str(adapter), "--device", device]) == 2
    err = capsys.readouterr().err
    assert message in err and "'cpu'" in err, err


def test_bad_adapters_and_models_are_refused_before_loading(pair, document, tmp_path, capsys, monkeypatch):
    base, adapter = pair
    never_read_or_loaded(monkeypatch)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    bare = tmp_path / "bare"
    shutil.copytree(adapter, bare)
    config = json.loads((bare / "adapter_config.json").read_text())
    (bare / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    cases = [
        (["--adapter", str(tmp_path)], "the folder has no adapter_config.json"),
        (["--adapter", "./no/such/adapter"], "no such folder (nor a Hub id owner/name)"),
        (["--adapter", str(lora)], "is a 'LORA' adapter, not a beacon adapter"),
        (["--adapter", str(bare)], "names no base model (base_model_name_or_path): give --model"),
        (["--adapter", str(adapter), "--model", str(tmp_path / "missing")], "cannot read its config"),
        (["--adapter", str(adapter), "--ratio", "2"], "--ratio=2 is not one of the adapter's ratios [4, 8]"),
    ]
    for extra, message in cases:
        assert main("ask", [str(document), "-q", QUESTION, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err, (extra, err)


def test_4bit_needs_bitsandbytes_and_a_cpu_or_cuda_device(monkeypatch):
    with pytest.raises(ValueError, match="--load-in-4bit runs on cpu or cuda"):
        loading.check_4bit("mps")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs bitsandbytes: pip install 'beacon-peft\[quant\]'"):
        loading.check_4bit("cpu")


def test_check_device_resolves_auto_and_names_what_there_is():
    assert loading.check_device("cpu") == "cpu"
    assert loading.check_device("auto") in loading.available_devices()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device cuda: not available here; this machine has \['cpu'"):
            loading.check_device("cuda")


@pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed (pip install '.[quant]')")
def test_ask_with_a_4bit_base_on_the_cpu(document, tmp_path, capsys, monkeypatch):
    import bitsandbytes as bnb

    # the CPU 4-bit kernels want MLP widths in multiples of 64 (tests/test_quantized.py)
    base, adapter = make_pair(tmp_path, intermediate_size=128)
    loaded = {}
    real_load = loading.load

    def spy(*args, **kwargs):
        loaded["model"], tokenizer = real_load(*args, **kwargs)
        return loaded["model"], tokenizer

    monkeypatch.setattr(loading, "load", spy)
    assert main("ask", [str(document), "-q", QUESTION, "--adapter", str(adapter), "--load-in-4bit", "--device", "cpu",
                        "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert len(answers(out)) == 1 and "(4-bit nf4)" in err
    quantized = [m for m in loaded["model"].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 and all(m.weight.quant_type == "nf4" for m in quantized)  # q/k/v/o + MLP


def hub_env(endpoint: str, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN")}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_TOKEN": "hf_local_test_token",
            "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


AUTO_PEFT = """
import sys, torch, beacon_peft
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM
repo, base_dir, adapter_dir = sys.argv[1:]
ids = torch.randint(3, 40, (1, 40), generator=torch.Generator().manual_seed(0))
hub = AutoPeftModelForCausalLM.from_pretrained(repo).eval()
local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
for model in (hub, local):
    model.base_model.set_compression_ratio(4)
with torch.no_grad():
    assert torch.equal(hub(input_ids=ids).logits, local(input_ids=ids).logits)
print("equal logits")
"""


def test_an_adapter_and_its_base_by_hub_id_from_a_local_hub(pair, document, tmp_path):
    """The Hub convention end to end: the adapter's base_model_name_or_path is the base's Hub id, so `ask
    --adapter owner/name` loads both from the Hub (here tests/hub_server.py), and so does AutoPeftModelForCausalLM."""
    from hub_server import HubServer
    from huggingface_hub import HfApi

    base, adapter = pair
    hub_adapter = tmp_path / "hub-adapter"
    shutil.copytree(adapter, hub_adapter)
    config = json.loads((hub_adapter / "adapter_config.json").read_text())
    (hub_adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "tester/tiny"}))
    expected = library_answer(base, adapter, document.read_text(), ratio=8)
    with HubServer() as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_local_test_token")
        for repo, folder in (("tester/tiny", base), ("tester/tiny-beacon", hub_adapter)):
            api.create_repo(repo)
            api.upload_folder(repo_id=repo, folder_path=str(folder))
        env = hub_env(hub.endpoint, tmp_path / "hf")
        result = subprocess.run([sys.executable, "-m", "beacon_peft.cli", "ask", str(document), "-q", QUESTION,
                                 "--adapter", "tester/tiny-beacon", "--max-new-tokens", "4", "--device", "cpu"],
                                capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        auto = subprocess.run([sys.executable, "-c", AUTO_PEFT, "tester/tiny-beacon", str(base), str(adapter)],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        missing = subprocess.run([sys.executable, "-m", "beacon_peft.cli", "ask", str(document), "-q", QUESTION,
                                  "--adapter", "tester/none"], capture_output=True, text=True, env=env, cwd=ROOT,
                                 timeout=300)
    assert result.returncode == 0, result.stderr
    assert "loaded tester/tiny with adapter" in result.stderr and answers(result.stdout) == [expected]
    assert auto.returncode == 0 and "equal logits" in auto.stdout, auto.stderr
    assert missing.returncode == 2 and "--adapter tester/none: no such folder, and the Hub did not give it" in \
        missing.stderr, missing.stderr
