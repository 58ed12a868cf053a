"""Multi-process training and the Hub round trip, as users run them.

- DDP over gloo in 2 CPU processes, started by ``accelerate launch --multi_gpu``: one final adapter, checkpoints,
  the card names the processes.
- FSDP2 (``recipes/configs/accelerate/fsdp-cpu.yaml``: frozen base and beacon parameters sharded per decoder layer)
  in 2 CPU processes over gloo, started by ``accelerate launch``: the saved adapter equals a 1-process run with the
  same seed, data and global batch (and each process holds only its shards of the parameters, seen from inside the
  run), and a run whose worker is SIGKILLed between checkpoints, resumed, gives the same adapter.
- The DeepSpeed ZeRO-2/3 accelerate configs load with accelerate's own config parser (DeepSpeed is not installed).
- The Hub round trip (``model.push_to_hub``, ``trainer.push_to_hub`` at the end of a recipe run, then
  ``PeftModel.from_pretrained(base, repo)`` from a clean cache) against a Hub-compatible HTTP server started by the
  test on 127.0.0.1 (`hub_server.py`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_recipe import ROOT, SCRIPT, W, base_args, base_model, run_script

ACCELERATE_DIR = ROOT / "recipes" / "configs" / "accelerate"
FSDP_CPU = ACCELERATE_DIR / "fsdp-cpu.yaml"
PROBE = Path(__file__).with_name("fsdp_probe.py")  # recipes/train.py recording each process's parameter shards
TOLERANCE = 1e-6  # observed: 1.2e-7 (a dummy row changes the batch shape on some steps)


def run_args(model_dir, text_dir, out, *extra: str) -> list[str]:
    # random order: group_by_length groups by the per-process batch, so 1 and 2 processes would see other orders
    return base_args(model_dir, text_dir, out, "--train_sampling_strategy", "random", "--ratio_mix", "step",
                     "--per_device_train_batch_size", "1", *extra)


def launch(config: Path, argv: list[str], timeout: int = 300, script: Path = SCRIPT, fails: bool = False) -> str:
    """``accelerate launch --config_file config recipes/train.py argv`` (or another ``script``); returns stdout +
    stderr. The launch must succeed, or fail when ``fails``."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(config),
           "--main_process_port", str(29500 + os.getpid() % 1000), str(script), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert (proc.returncode != 0) == fails, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def assert_sharded_by_fsdp2(probe: Path, processes: int = 2) -> None:
    """What `fsdp_probe.py` saw inside each process after the first step: every parameter (the frozen base's and
    the beacon ones) is a DTensor sharded along dim 0, each process holds a part, and the parts add up to the
    whole. Under DDP (or one process) every parameter would be a plain full tensor."""
    records = [json.loads((probe / f"shards-rank{r}.json").read_text()) for r in range(processes)]
    assert [(r["rank"], r["world"]) for r in records] == [(r, processes) for r in range(processes)]
    params = records[0]["params"]
    assert any("beacon_" in n for n in params) and any(".layers.1." in n and "base_layer" in n for n in params)
    for name, p in params.items():
        views = [r["params"][name] for r in records]
        assert all(v["type"] == "DTensor" and v["placements"] == ["S(0)"] for v in views), (name, views)
        assert sum(v["local_numel"] for v in views) == p["numel"], (name, views)
        if p["shape"][0] >= processes:  # no process holds it whole (the (1, hidden) beacon embedding: one does)
            assert all(v["local_numel"] < p["numel"] for v in views), (name, views)
    assert records[0]["model_class"].startswith("FSDP"), records[0]["model_class"]  # fully_shard's wrapper class


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------- DDP


def test_accelerate_launch_two_cpu_processes(model_dir, text_dir, tmp_path):
    """DDP over gloo with 2 CPU processes. accelerate 1.15 starts a single process for `launch --cpu` (its multi-CPU
    path needs mpirun), so the processes are started by its torchrun launcher (`--multi_gpu`); with no GPU the script
    sets ACCELERATE_USE_CPU and Trainer builds a gloo process group."""
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "ddp"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
           str(SCRIPT), *base_args(model_dir, text_dir, out, "--max_steps", "3", "--per_device_train_batch_size", "1",
                                   "--save_strategy", "steps", "--save_steps", "3",
                                   "--activation_checkpointing", "true")]
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


# ---------------------------------------------------------------------------------------------- FSDP


@pytest.fixture(scope="module")
def fsdp_run(model_dir, text_dir, tmp_path_factory):
    """8 steps of 2 processes x batch 1 under FSDP2 (gloo), and the same 8 steps in 1 process x batch 1 x 2
    accumulation steps: the same samples per optimizer step, the same step ratios. Step 6 pairs sequences with
    different numbers of window steps (a collective mismatch before `distributed.equalize_window_steps`)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    single = run_script(run_args(model_dir, text_dir, tmp / "single", "--max_steps", "8",
                                 "--gradient_accumulation_steps", "2"))
    log = launch(FSDP_CPU, [str(tmp / "probe"), *run_args(model_dir, text_dir, tmp / "fsdp", "--max_steps", "8")],
                 script=PROBE)
    return single, tmp / "fsdp", log, tmp / "probe"


def test_fsdp2_two_cpu_processes_match_one_process(fsdp_run):
    single, out, log, probe = fsdp_run
    # accelerate 1.15 alone would have trained with DDP here (FSDP is off for CPU processes); the log line is
    # printed before any wrapping, so what each process saw of its parameters is the proof
    assert "no GPU: FSDP2 over gloo on the CPU (2 processes)" in log
    assert_sharded_by_fsdp2(probe)
    assert "find_unused_parameters" not in log  # no DDP reducer
    diff = max_abs_diff(adapter(single.final_dir), adapter(out / "final"))
    assert diff <= TOLERANCE, diff
    state = json.loads((out / "final" / "training_log.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, 9))
    assert state["log_history"][-1]["num_input_tokens_seen"] == single.state.num_input_tokens_seen  # no dummy rows
    assert "2 process(es)" in (out / "final" / "README.md").read_text()


def test_fsdp2_rows_longer_than_one_pass_get_dummy_rows_and_match_one_process(model_dir, text_dir, tmp_path):
    """With `group_tokens` = one window, rows of different lengths need different numbers of decoder passes, so
    the shorter process gets a dummy row (`distributed.equalize_window_steps`); the adapter still equals 1 process's.
    (At the default budget every row here fits one pass and no dummy row is added: the test above.)"""
    single = run_script(run_args(model_dir, text_dir, tmp_path / "single", "--max_steps", "8",
                                 "--gradient_accumulation_steps", "2", "--group_tokens", str(W)))
    log = launch(FSDP_CPU, run_args(model_dir, text_dir, tmp_path / "fsdp", "--max_steps", "8",
                                    "--group_tokens", str(W)))
    assert "no GPU: FSDP2 over gloo on the CPU (2 processes)" in log
    assert max_abs_diff(adapter(single.final_dir), adapter(tmp_path / "fsdp" / "final")) <= TOLERANCE
    assert PeftModel.from_pretrained(base_model(model_dir), tmp_path / "fsdp" / "final").peft_config[
        "default"].group_tokens == W


def test_fsdp2_run_killed_between_checkpoints_resumes_to_the_same_adapter(fsdp_run, model_dir, text_dir, tmp_path):
    """The FSDP2 run with checkpoints every 4 steps; the process of rank 1 SIGKILLs itself at the end of step 6 (steps
    5-6 done, not saved) and the launcher takes the other one down; resumed under FSDP2 with
    ``--resume_from_checkpoint true`` (from checkpoint-4) to step 8: the uninterrupted run's adapter."""
    _, out, _, _ = fsdp_run
    uninterrupted = adapter(out / "final")
    killed = tmp_path / "killed"
    checkpoints = ("--save_strategy", "steps", "--save_steps", "4")
    log = launch(FSDP_CPU, [str(tmp_path / "probe"), "--sigkill-rank1-at-step", "6",
                            *run_args(model_dir, text_dir, killed, "--max_steps", "8", *checkpoints)],
                 script=PROBE, fails=True)
    assert re.search(r"Signal 9 \(SIGKILL\)|exitcode\s*:\s*-9", log), log[-3000:]
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith(("checkpoint-", "final"))) == ["checkpoint-4"]
    assert max_abs_diff(adapter(killed / "checkpoint-4"), uninterrupted) > 1e-4  # steps 5-8 still change it
    launch(FSDP_CPU, run_args(model_dir, text_dir, killed, "--max_steps", "8", *checkpoints,
                              "--resume_from_checkpoint", "true"))
    state = json.loads((killed / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, 9))
    assert max_abs_diff(adapter(killed / "final"), uninterrupted) <= TOLERANCE


def test_fsdp2_window_ratios_batches_and_checkpointing(model_dir, text_dir, tmp_path):
    """Per-window random ratios (different on the two processes), 2 sequences per process and activation
    checkpointing under FSDP2: every step runs (no collective mismatch) and the adapter reloads."""
    out = tmp_path / "fsdp"
    argv = base_args(model_dir, text_dir, out, "--max_steps", "8", "--ratio_mix", "window",
                     "--per_device_train_batch_size", "2", "--activation_checkpointing", "true")
    assert "no GPU: FSDP2 over gloo on the CPU (2 processes)" in launch(FSDP_CPU, argv)
    log = json.loads((out / "final" / "training_log.json").read_text())
    assert [e["step"] for e in log["log_history"] if "loss" in e] == list(range(1, 9))
    assert len({r for _, r in log["ratio_history"]}) > 1
    reloaded = PeftModel.from_pretrained(base_model(model_dir), out / "final")
    assert reloaded.peft_config["default"].ratio_mix == "step-random"


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


# ---------------------------------------------------------------------------------------------- Hub round trip

PUSH = """
import os, sys, torch, beacon_peft
from huggingface_hub import ModelCard, create_repo
from peft import PeftModel
from transformers import AutoModelForCausalLM
model_dir, final_dir, repo = sys.argv[1:]
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
model = PeftModel.from_pretrained(base, final_dir)
# model.push_to_hub writes the repo's existing card (or transformers' blank template on a new repo) as README.md:
# push the run's beacon card first so that it is the one kept
create_repo(repo, exist_ok=True)
ModelCard.load(os.path.join(final_dir, "README.md")).push_to_hub(repo)
print("pushed", model.push_to_hub(repo, commit_message="beacon adapter"))
"""

PULL = """
import json, sys, torch, beacon_peft
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForCausalLM
model_dir, final_dir, out, *repos = sys.argv[1:]
torch.manual_seed(0)
ids = torch.randint(3, 60, (2, 100))
def logits(source):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, source).eval()
    model.base_model.set_compression_ratio(4)
    with torch.no_grad():
        return model(input_ids=ids).logits
local = logits(final_dir)
result = {}
for repo in repos:
    hub = logits(repo)
    card = ModelCard.load(repo)
    result[repo] = dict(equal=bool(torch.equal(local, hub)), max_diff=(local - hub).abs().max().item(),
                        library_name=card.data.library_name, tags=card.data.tags, base_model=card.data.base_model,
                        text=card.text)
json.dump(result, open(out, "w"))
"""


def hub_env(endpoint: str, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN")}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_TOKEN": "hf_local_test_token",
            "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_py(argv: list[str], env: dict, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def test_hub_round_trip_against_a_local_server(model_dir, text_dir, tmp_path):
    """hf-local-hub 3.0.0 (PyPI) is only a client for a separate Go binary it does not ship, so the server is
    `hub_server.HubServer` (stdlib http.server, 127.0.0.1, a free port), stopped when the test ends."""
    from hub_server import HubServer

    out = tmp_path / "run"
    with HubServer() as hub:
        env = hub_env(hub.endpoint, tmp_path / "hf-push")
        # a recipe run that ends with trainer.push_to_hub()
        run_py([str(SCRIPT), *run_args(model_dir, text_dir, out, "--max_steps", "3", "--push_to_hub", "true",
                                       "--hub_model_id", "tester/beacon-recipe")], env)
        # model.push_to_hub(repo) of the saved adapter
        run_py(["-c", PUSH, str(model_dir), str(out / "final"), "tester/beacon-model"], env)
        # PeftModel.from_pretrained(base, repo) from a clean cache
        clean = hub_env(hub.endpoint, tmp_path / "hf-clean")
        run_py(["-c", PULL, str(model_dir), str(out / "final"), str(tmp_path / "pull.json"), "tester/beacon-recipe",
                "tester/beacon-model"], clean)
        requests = list(hub.requests)
        files = {repo_id: sorted(repo.files) for (_, repo_id), repo in hub.repos.items()}
    print(files)
    assert not hub.thread.is_alive()  # stopped

    unserved = [r for r in requests if r[2] == 404 and "NotImplemented" in r[1]]
    assert not [r for r in requests if r[2] >= 500] and not unserved, requests
    called = {(m, p.split("/")[2] if p.startswith("/api/") else "resolve") for m, p, _ in requests}
    print(sorted({(m, re.sub(r"tester/[a-z-]+", "{repo}", p), s) for m, p, s in requests}))
    assert {("POST", "repos"), ("POST", "validate-yaml"), ("POST", "models"), ("GET", "resolve"),
            ("HEAD", "resolve")} <= called
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files["tester/beacon-recipe"])
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files["tester/beacon-model"])
    assert not any(f.startswith("checkpoint-") for f in files["tester/beacon-recipe"])

    local_card = (out / "final" / "README.md").read_text()
    result = json.loads((tmp_path / "pull.json").read_text())
    for repo, r in result.items():
        assert r["equal"] and r["max_diff"] == 0.0, (repo, r["max_diff"])
        assert r["library_name"] == "peft", repo
        assert {"activation-beacon", "peft"} <= set(r["tags"]), (repo, r["tags"])
        assert r["base_model"] == str(model_dir), repo
        # the beacon model card with its figures arrives intact (trainer.push_to_hub writes it as the README)
        assert "## Beacon settings" in r["text"] and "wall time" in r["text"], repo
        assert r["text"].strip() == local_card.split("---", 2)[2].strip(), repo
