"""Fixtures of tests/training: one intra-op thread per module, a tiny random Llama with a word-level tokenizer on
disk, and the text and chat data the tiny runs train on (helpers in tiny_recipe.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_recipe import WORDS, document, make_tokenizer


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
