"""Golden outputs for refactors: dump what the beacon path computes, then check a later tree gives the same bits.

    python scripts/golden.py dump  before.safetensors    # on the tree before the change
    python scripts/golden.py check before.safetensors    # on the tree after it: every tensor bit-identical

A tensor the baseline holds and the tree no longer makes fails the check; tensors the tree adds (a gradient that
did not exist when the baseline was dumped, such as the ratio-0 beacon embedding's zero gradient since issue 32)
are counted and listed, and fail only with ``--strict``.

Covers the 4 tiny architectures under every official mode (interleave / append, full-coverage / step-expansion /
segmentation, sink, overlapping windows, ratio 0, step-random ratios, low-rank projections), eager and sdpa, a
left-padded batch, continuation from a memory, greedy generate(), and a training step's loss and adapter
gradients. The tensors stored per case: logits, every memory part of every layer, gradients.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

MODES = {
    "interleave": dict(window=16, ratios=[4]),
    "interleave_sink": dict(window=16, ratios=[2, 4, 8], ratio_mix="step-random", ratio_seed=3, sink_size=2),
    "append_expansion": dict(window=16, ratios=[4], placement="append", attention_scope="step-expansion"),
    "append_segmentation": dict(window=16, ratios=[8], placement="append", attention_scope="segmentation",
                                attend_prev=False, sink_size=1),
    "append_overlap": dict(window=16, stride=8, ratios=[4], placement="append"),
    "ratio0": dict(window=16, ratios=[0]),
    "lowrank_o": dict(window=16, ratios=[4], beacon_rank=4, beacon_projections=["q", "k", "v", "o"]),
}


GROUP_TOKENS: dict = {}  # --group-tokens: the decoder-pass budget every case runs with (default: the config's)


def _model(arch: str, attn: str, mode: dict):
    from peft import get_peft_model
    from tiny import perturb_beacons, tiny_model

    import beacon_peft

    config = beacon_peft.BeaconConfig(**mode, **GROUP_TOKENS)
    model = get_peft_model(tiny_model(arch, attn=attn, intermediate_size=128), config)
    perturb_beacons(model)
    return model


def _memory(prefix: str, memory, out: dict) -> None:
    for i, lm in enumerate(memory.state.layers):
        for name, t in zip(("sink_k", "sink_v", "comp_k", "comp_v", "raw_k", "raw_v"), lm.tensors()):
            out[f"{prefix}/mem{i}/{name}"] = t.detach().contiguous()


def cases() -> dict[str, torch.Tensor]:
    from tiny import random_ids

    from beacon_peft.labels import IGNORE_INDEX

    out: dict[str, torch.Tensor] = {}
    ids = random_ids(2, 45, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    for arch in ("llama", "mistral", "qwen2", "qwen3"):
        for attn in ("eager", "sdpa"):
            for name, mode in MODES.items():
                key = f"{arch}/{attn}/{name}"
                model = _model(arch, attn, mode).eval()
                with torch.no_grad():
                    res = model(input_ids=ids, attention_mask=mask)
                    out[f"{key}/logits"] = res.logits
                    _memory(key, res.past_key_values, out)
                    more = random_ids(2, 9, seed=6)
                    cont = model(input_ids=more, attention_mask=torch.cat((mask, torch.ones_like(more)), 1),
                                 past_key_values=res.past_key_values)
                    out[f"{key}/continued"] = cont.logits
                    gen = model.generate(input_ids=ids[:1, :30], max_new_tokens=6, do_sample=False)
                    out[f"{key}/generate"] = gen
                model.train()
                torch.manual_seed(0)
                loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, IGNORE_INDEX)).loss
                if loss.requires_grad:  # ratio 0 has no beacon, so nothing of the adapter is used
                    loss.backward()
                out[f"{key}/loss"] = loss.detach()[None]
                for pname, p in model.named_parameters():
                    if p.grad is not None:
                        out[f"{key}/grad/{pname}"] = p.grad
    out.update(reference_cases())
    return out


def reference_cases() -> dict[str, torch.Tensor]:
    """The official reference checkpoint (converted), both variants, on every stored input, eval and train."""
    import tempfile

    import reference

    out: dict[str, torch.Tensor] = {}
    try:
        reference.require_reference()
    except BaseException:  # pytest's Skipped: no reference outputs in this checkout
        print("no reference checkpoint found: its cases are left out")
        return out
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, adapters = reference.converted(Path(tmp))
        for variant, folder in adapters.items():
            for attn in ("eager", "sdpa"):
                model = reference.load_model(base_dir, folder, attn=attn)
                for config in model.peft_config.values():
                    config.group_tokens = GROUP_TOKENS.get("group_tokens", config.group_tokens)
                for name, ids in reference.inputs().items():
                    if ids.dtype != torch.long or ids.dim() != 2:
                        continue
                    with torch.no_grad():
                        res = model(input_ids=ids)
                    out[f"ref/{variant}/{attn}/{name}/logits"] = res.logits
                    _memory(f"ref/{variant}/{attn}/{name}", res.past_key_values, out)
    return out


def main(argv=None) -> int:
    from safetensors.torch import load_file, save_file

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["dump", "check"])
    p.add_argument("file", type=Path)
    p.add_argument("--group-tokens", type=int, default=None,
                   help="run every case with this group_tokens (1: the window-by-window loop)")
    p.add_argument("--atol", type=float, default=0.0,
                   help="check: floating tensors may differ by at most atol + rtol * |before| (default: bit-identical)")
    p.add_argument("--rtol", type=float, default=0.0)
    p.add_argument("--strict", action="store_true",
                   help="check: also fail on tensors the baseline does not hold (by default they are listed only)")
    args = p.parse_args(argv)
    if args.group_tokens is not None:
        GROUP_TOKENS["group_tokens"] = args.group_tokens
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    now = cases()
    if args.action == "dump":
        save_file({k: v.contiguous() for k, v in now.items()}, str(args.file))
        print(f"wrote {len(now)} tensors to {args.file}")
        return 0
    code, lines = compare(load_file(str(args.file)), now, args.atol, args.rtol, args.strict)
    print("\n".join(lines))
    return code


def compare(before: dict, now: dict, atol: float = 0.0, rtol: float = 0.0, strict: bool = False):
    """(exit code, report lines) of a check of ``now`` against the baseline ``before`` (name -> tensor).

    Tensors both hold are compared (bit-identical, or within ``atol + rtol * |before|`` for floating ones). A
    tensor the baseline holds and ``now`` lacks is a change (exit 1); one ``now`` adds (a case or a gradient that
    did not exist when the baseline was dumped) is listed and fails only with ``strict``."""
    missing, extra = sorted(set(before) - set(now)), sorted(set(now) - set(before))

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if (atol or rtol) and a.dtype.is_floating_point:
            return torch.allclose(b, a, atol=atol, rtol=rtol)
        return torch.equal(a, b)

    common = sorted(set(before) & set(now))
    differ = [k for k in common if not same(before[k], now[k])]
    worst = max(((now[k] - before[k]).abs().max().item(), k) for k in common
                if before[k].dtype.is_floating_point and before[k].shape == now[k].shape and before[k].numel()) \
        if common else (0.0, "-")
    lines = [f"{len(before)} tensors before, {len(now)} now: {len(common)} compared, {len(differ)} differ"
             f"{f' beyond atol={atol} rtol={rtol}' if atol or rtol else ''}, {len(missing)} missing, {len(extra)} new "
             f"(not compared{'' if strict else '; --strict fails on them'}); largest absolute difference "
             f"{worst[0]:.3g} ({worst[1]})"]
    kinds = sorted({k.split("/")[3] if k.count("/") > 3 else k.split("/")[-1] for k in differ})
    if differ:
        lines.append("   kinds that differ: " + ", ".join(kinds))
    for label, keys in (("differs", differ), ("missing", missing), ("new", extra)):
        lines += [f"   {label}: {k}" for k in keys[:20]]
    return (1 if differ or missing or (strict and extra) else 0), lines


if __name__ == "__main__":
    raise SystemExit(main())
