"""Multi-process training and the Hub round trip, as users run them.

- FSDP2 (``recipes/configs/accelerate/fsdp-cpu.yaml``: frozen base and beacon parameters sharded per decoder layer)
  in 2 CPU processes over gloo, started by ``accelerate launch``: the saved adapter equals a 1-process run with the
  same seed, data and global batch, and a run stopped at a checkpoint and resumed gives the same adapter.
- The DeepSpeed ZeRO-2/3 accelerate configs load with accelerate's own config parser (DeepSpeed is not installed).
- The Hub round trip (``model.push_to_hub``, ``trainer.push_to_hub`` at the end of a recipe run, then
  ``PeftModel.from_pretrained(base, repo)`` from a clean cache) against a Hub-compatible HTTP server started by the
  test on 127.0.0.1 (`hub_server.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_recipes import ROOT, SCRIPT, base_args, base_model, document, make_tokenizer, run_script  # noqa: F401

ACCELERATE_DIR = ROOT / "recipes" / "configs" / "accelerate"
FSDP_CPU = ACCELERATE_DIR / "fsdp-cpu.yaml"
TOLERANCE = 1e-6  # observed: 0.0 (identical floats)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    import random

    path = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    for i in range(12):
        (path / f"doc{i:02d}.txt").write_text(document(rng, rng.randint(80, 160)))
    return path


def run_args(model_dir, text_dir, out, *extra: str) -> list[str]:
    # random order: group_by_length groups by the per-process batch, so 1 and 2 processes would see other orders
    return base_args(model_dir, text_dir, out, "--train_sampling_strategy", "random", "--ratio_mix", "step",
                     "--per_device_train_batch_size", "1", *extra)


def launch(config: Path, argv: list[str], timeout: int = 300) -> str:
    """``accelerate launch --config_file config recipes/train.py argv``; returns stdout + stderr."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(config),
           "--main_process_port", str(29500 + os.getpid() % 1000), str(SCRIPT), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------- FSDP


def test_fsdp2_two_cpu_processes_match_one_process_and_resume(model_dir, text_dir, tmp_path):
    """2 processes x batch 1 (FSDP2, gloo) against 1 process x batch 1 x 2 accumulation steps: the same samples
    per optimizer step, the same step ratios. Then the same FSDP run stopped after step 2 (its checkpoint) and
    resumed to step 4 with ``--resume_from_checkpoint true``."""
    single = run_script(run_args(model_dir, text_dir, tmp_path / "single", "--max_steps", "4",
                                 "--gradient_accumulation_steps", "2"))
    log = launch(FSDP_CPU, run_args(model_dir, text_dir, tmp_path / "fsdp", "--max_steps", "4"))
    # accelerate 1.15 alone would have trained with DDP here (FSDP is off for CPU processes)
    assert "no GPU: FSDP2 over gloo on the CPU (2 processes)" in log
    assert "find_unused_parameters" not in log  # no DDP reducer
    reference, sharded = adapter(single.final_dir), adapter(tmp_path / "fsdp" / "final")
    assert max_abs_diff(reference, sharded) <= TOLERANCE, max_abs_diff(reference, sharded)
    card = (tmp_path / "fsdp" / "final" / "README.md").read_text()
    assert "2 process(es)" in card

    # stopped at its step-2 checkpoint, then resumed under FSDP to step 4
    stopped = tmp_path / "stopped"
    launch(FSDP_CPU, run_args(model_dir, text_dir, stopped, "--max_steps", "2", "--save_strategy", "steps",
                              "--save_steps", "2"))
    assert (stopped / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert max_abs_diff(adapter(stopped / "final"), sharded) > 1e-4  # steps 3-4 still change the adapter
    log = launch(FSDP_CPU, run_args(model_dir, text_dir, stopped, "--max_steps", "4", "--save_strategy", "steps",
                                    "--save_steps", "2", "--resume_from_checkpoint", "true"))
    state = json.loads((stopped / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]
    assert max_abs_diff(adapter(stopped / "final"), sharded) <= TOLERANCE


@pytest.mark.parametrize("name", ["deepspeed-zero2.yaml", "deepspeed-zero3.yaml"])
def test_deepspeed_configs_load(name):
    """DeepSpeed is not installed here (see docs/training.md): the configs are checked by accelerate's parser."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE_DIR / name))
    assert config.distributed_type == "DEEPSPEED" and config.num_processes == 8
    ds = config.deepspeed_config
    assert ds["zero_stage"] == int(name[-6]) and ds["gradient_accumulation_steps"] == "auto"
    if ds["zero_stage"] == 3:
        assert ds["zero3_save_16bit_model"] is True  # the final adapter is gathered from the shards on save
