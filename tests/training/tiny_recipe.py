"""Shared by the tests of tests/training: recipes/train.py loaded as a module (to call its ``main()`` in-process), a
word-level tokenizer over a small vocabulary, the documents the tiny runs train on, and the command line they share.

The fixtures built from these (the tiny random Llama on disk, the text and chat data) are in conftest.py.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import torch

import beacon_peft  # noqa: F401  (registers BEACON with PEFT)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "recipes" / "train.py"


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
    total, count = 0.0, 0
    with torch.no_grad(), model.base_model.compression_ratio(ratio):
        for ids in seqs:
            x = torch.tensor([ids])
            n = len(ids) - 1
            total += model(input_ids=x, labels=x).loss.item() * n
            count += n
    return total / count


def base_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
