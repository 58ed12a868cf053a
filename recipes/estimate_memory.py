"""Adapter size and GPU-memory estimate of a training config, from a meta-device model (no weights, no GPU).

The base is built from its config on the ``meta`` device and wrapped with the config's adapter, so the parameter
counts are exact; the memory is `beacon_peft.training.sizing.training_memory` (4-bit base, or bf16 without
``load_in_4bit``, adapter weights + grads + Adam, activations kept by checkpointing for one ``max_length`` sequence at
the peak ratio, the smallest).

    python recipes/estimate_memory.py --config recipes/configs/llama3-8b-pretrain-qlora-lowrank.yaml

``--model_config`` takes a folder or hub id with a config.json; by default the shapes of the config's
``model_name_or_path`` come from `sizing.PRESETS` (Llama-3-8B, Qwen2.5-7B, Gemma 3 1B, gpt-oss-20b), else from the
hub.
"""

from __future__ import annotations

import argparse

import yaml

from beacon_peft.training.arguments import BeaconArguments, ModelArguments
from beacon_peft.training.sizing import PRESETS, adapter_footprint, meta_model, training_memory


def _fields(raw: dict, cls) -> dict:
    return {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a recipes/configs YAML")
    parser.add_argument("--model_config", default=None, help="folder or hub id with the base's config.json")
    parser.add_argument("--length", type=int, default=None, help="sequence length (default: max_length)")
    parser.add_argument("--ratio", type=int, default=None, help="compression ratio (default: the smallest)")
    args = parser.parse_args(argv)

    raw = yaml.safe_load(open(args.config))
    beacon_args = BeaconArguments(**_fields(raw, BeaconArguments))
    model_args = ModelArguments(**_fields(raw, ModelArguments))
    config = beacon_args.to_config()
    model_config = PRESETS.get(args.model_config or model_args.model_name_or_path)
    if model_config is None:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(args.model_config or model_args.model_name_or_path)
    length = args.length or raw["max_length"]
    ratio = args.ratio or min(r for r in config.ratios if r > 0)
    wide = 4 if beacon_args.beacon_dtype == "float32" else 2  # torch AdamW keeps states in the parameter dtype

    footprint = adapter_footprint(meta_model(model_config, config))
    memory = training_memory(model_config, config, length, ratio, model_args.upcast_unquantized, wide, 2 * wide,
                             load_in_4bit=model_args.load_in_4bit)
    print(f"adapter: {footprint.trainable:,} trainable + {footprint.frozen:,} frozen parameters "
          f"(beacon_rank={config.beacon_rank}, projections {config.beacon_projections})")
    print(f"adapter file: {footprint.file_bytes(2):,} B in bf16, {footprint.file_bytes(4):,} B in fp32")
    print(f"weights + grads + Adam: {footprint.training_bytes(4, 4, 8):,} B (fp32), "
          f"{footprint.training_bytes(2, 2, 4):,} B (bf16, torch AdamW)")
    print(f"\nGPU memory, one {length}-token sequence at ratio {ratio} (upcast_unquantized="
          f"{model_args.upcast_unquantized}, beacon_dtype={beacon_args.beacon_dtype}):")
    for key, value in memory.items():
        print(f"  {key:34s} {value / 1e9:7.2f} GB  {value / 2**30:7.2f} GiB")
    return {"footprint": footprint, "memory": memory}


if __name__ == "__main__":
    main()
