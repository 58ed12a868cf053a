"""GPU smoke check (run on a lent CUDA machine): every tiny architecture (tiny.ARCHS and tiny.MORE_ARCHS), bf16
base + fp32 adapter, sdpa and eager.

Checks on the device what the CPU suite checks on the CPU, in seconds: compression off equals the base model;
a training step (CE + KL to the full-attention teacher) gives finite gradients in adapter parameters only, and the
read-back loop's chunked losses (`readback.losses.head_losses` from the decoder's last hidden states) equal those
from the model's full logits (tests/readback_reference.py);
generate() continues from the memory (greedy ids equal one forward over the whole sequence, step by step).
Prints one line per check and exits non-zero on the first failure.

    PYTHONPATH=.:tests python scripts/device/smoke.py
"""

import sys
import time
from functools import partial

import torch
from peft import get_peft_model
from readback_reference import kl_to_teacher, masked_ce
from tiny import ARCHS, MORE_ARCHS, random_ids, tiny_auto, tiny_model

import beacon_peft
from beacon_peft.labels import IGNORE_INDEX
from beacon_peft.training.readback.losses import decoder_and_head, head_losses

device = "cuda" if torch.cuda.is_available() else "cpu"
print("device", device, torch.cuda.get_device_name(0) if device == "cuda" else "", "torch", torch.__version__,
      flush=True)
failures = 0
for arch in (*ARCHS, *MORE_ARCHS):
    for attn in ("sdpa", "eager"):
        build = partial(tiny_model, arch) if arch in ARCHS else partial(tiny_auto, arch)
        t0 = time.time()
        try:
            base = build(attn=attn).to(device)
            ids = random_ids(2, 150).to(device)
            with torch.no_grad():
                ref = base(input_ids=ids).logits.float()  # fp32 reference
                base.to(torch.bfloat16)
                noise = (base(input_ids=ids).logits.float() - ref).abs().max()  # what bf16 alone costs
            off = get_peft_model(build(attn=attn).to(device, torch.bfloat16),
                                 beacon_peft.BeaconConfig(window=32, ratios=[0]))
            with torch.no_grad():
                got = off(input_ids=ids).logits.float()
            err = (got - ref).abs().max()
            assert err <= 2 * noise + 1e-3, \
                f"ratio 0 in bf16 differs from fp32 base by {err:.3g} (bf16 base: {noise:.3g})"
            model = get_peft_model(base, beacon_peft.BeaconConfig(window=32, ratios=[2, 4, 8]))
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            model.train()
            mask = torch.ones_like(ids)
            mask[1, 130:] = 0  # a right-padded row
            with torch.no_grad(), model.disable_adapter():
                teacher = model(input_ids=ids, attention_mask=mask).logits
            logits = model(input_ids=ids, attention_mask=mask).logits
            ce, n = masked_ce(logits, ids.masked_fill(mask == 0, IGNORE_INDEX))
            kl, m = kl_to_teacher(logits, teacher, mask.bool())
            decoder, head = decoder_and_head(model, ids[:1, :16])  # the read-back loop's path
            with torch.no_grad(), model.base_model.compression_ratio(8):  # both sides compress alike
                with model.disable_adapter():
                    t_hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
                full_logits = model(input_ids=ids, attention_mask=mask).logits
                want = [masked_ce(full_logits, ids.masked_fill(mask == 0, IGNORE_INDEX))[0],
                        kl_to_teacher(full_logits, teacher, mask.bool())[0]]
                s_hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
                got = head_losses(s_hidden, t_hidden, head, ids.masked_fill(mask == 0, IGNORE_INDEX),
                                  torch.full_like(ids, IGNORE_INDEX), mask.bool(), chunk=64)
            for name, w in zip(("text", "kl"), want):
                gap = abs(float(got[name][0]) - float(w))
                assert gap <= 1e-3 * max(1.0, abs(float(w))), \
                    f"head_losses {name} {float(got[name][0]):.4f} vs full logits {float(w):.4f}"
            (ce / n + kl / m).backward()
            grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
            assert grads and all("beacon_" in name for name in grads), "gradient outside the adapter"
            assert all(torch.isfinite(g).all() for g in grads.values()), "non-finite gradient"
            model.eval()
            prompt = ids[:1, :100]
            with torch.no_grad():
                gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                     do_sample=False, pad_token_id=0)
                with model.base_model.compression_ratio(4):
                    gen4 = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
                    full = model(input_ids=gen4[:, :-1]).logits[0, 99:].argmax(-1)
            assert gen.shape[1] == 106, f"generate returned {gen.shape}"
            agree = (full == gen4[0, 100:]).float().mean().item()
            assert agree == 1.0, f"generate vs one forward: {agree:.2f} of greedy ids agree"
            print(f"ok   {arch:8s} {attn:6s} loss {float(ce / n):.3f} kl {float(kl / m):.4f} "
                  f"({time.time() - t0:.1f}s)", flush=True)
        except Exception as exc:  # report every combination, then fail
            failures += 1
            print(f"FAIL {arch:8s} {attn:6s} {type(exc).__name__}: {exc}", flush=True)
sys.exit(1 if failures else 0)
