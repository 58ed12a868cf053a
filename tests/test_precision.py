"""--dtype auto picks bfloat16 only where bf16 is native; half precision matches fp32 within bf16's own error."""

import re

import pytest
import torch
from peft import get_peft_model
from tiny import random_ids, tiny_model

from beacon_peft import BeaconConfig
from beacon_peft.precision import DTYPE_NAMES, cpu_has_native_bf16, resolve_dtype

ZEN4 = "flags : fpu sse2 avx2 avx512f avx512_bf16 avx512vl"
SKYLAKE = "flags : fpu sse2 avx2 avx512f avx512vl"


def test_auto_follows_the_cpu_flags():
    assert cpu_has_native_bf16(ZEN4) and not cpu_has_native_bf16(SKYLAKE)
    assert resolve_dtype("auto", "cpu", cpuinfo=ZEN4) is torch.bfloat16
    assert resolve_dtype("auto", "cpu", cpuinfo=SKYLAKE) is torch.float32
    assert resolve_dtype("float32", "cpu", cpuinfo=ZEN4) is torch.float32
    assert resolve_dtype("bfloat16", "cpu", cpuinfo=SKYLAKE) is torch.bfloat16


@pytest.mark.parametrize("bad", ["bf16", "fp32", "", "Float32"])
def test_unknown_dtype_names_are_refused(bad):
    message = f"dtype={bad!r} is not allowed: choose one of {list(DTYPE_NAMES)}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):  # the whole message
        resolve_dtype(bad)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_inference_with_a_memory_matches_fp32(attn, half):
    """The split causal attention of a non-empty memory (sdpa, CPU) returned float32 and crashed the o_proj in bf16."""
    ids = random_ids(1, 90)
    config = BeaconConfig(window=16, ratios=[4])
    ref_base = tiny_model("llama", attn=attn)
    with torch.no_grad():
        ref = get_peft_model(tiny_model("llama", attn=attn), config).eval()(input_ids=ids).logits
        base32 = ref_base(input_ids=ids).logits
        noise = (ref_base.to(half)(input_ids=ids).logits.float() - base32).abs().max()  # what half precision costs
        model = get_peft_model(tiny_model("llama", attn=attn).to(half), config).eval()
        first = model(input_ids=ids[:, :50])
        rest = model(input_ids=ids[:, 50:], past_key_values=first.past_key_values).logits
    got = torch.cat([first.logits, rest], 1).float()
    assert got.dtype == torch.float32 and rest.dtype == half
    assert (got - ref).abs().max() <= 3 * noise + 1e-3


class Args:
    def __init__(self, bf16, fp16):
        self.bf16, self.fp16 = bf16, fp16


@pytest.mark.parametrize("bf16, fp16, asked", [(True, False, True), (False, True, True), (None, False, True),
                                               (False, False, False)])
def test_training_autocast_needs_a_gpu(monkeypatch, bf16, fp16, asked):
    from beacon_peft import precision

    monkeypatch.setattr(precision, "gpu_available", lambda: False)
    args = Args(bf16, fp16)
    assert precision.autocast_off_without_gpu(args) is asked
    assert (args.bf16, args.fp16) == (False, False)
    monkeypatch.setattr(precision, "gpu_available", lambda: True)
    args = Args(bf16, fp16)
    assert precision.autocast_off_without_gpu(args) is False and (args.bf16, args.fp16) == (bf16, fp16)
