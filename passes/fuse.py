"""`fuse`: the fusion plan and kernel table for the torch-triton runtime (README.md,
"Passes").

The plan (dwc.runtime.fusion) stacks q/k/v and gate/up into one GEMM each and turns on
the fused residual + RMSNorm, SwiGLU and rotary + KV-write kernels; the kernel table says which kernel
serves each op of a decoder layer on the target, with its shapes and tile settings. The
weights in model/ are not touched: the runtime applies the plan when it loads the
bundle (and `evaluate` measures the model with it applied).

The pass checks that fusion is lossless here and now: the runtime's logits with and
without the plan on `check_windows` evaluation windows, on this machine's device. The
largest difference relative to the logits' range and the top-1 agreement go to the
manifest's `fusion.check` and to reports/kernels.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dwc.config import option, positive
from dwc.quality.data import token_windows
from dwc.passes.base import Pass, PassResult
from dwc.compiler.reports import json_bytes
from dwc.runtime.fusion import DEFAULT_PLAN, kernel_table


@dataclass
class FuseOptions:
    qkv: bool = option(True, help="one GEMM for q, k and v")
    gate_up: bool = option(True, help="one GEMM for gate and up")
    norm_residual: bool = option(True, help="residual add + RMSNorm in one kernel (GPU)")
    silu_mul: bool = option(True, help="silu(gate) * up in one kernel (GPU)")
    rope_kv: bool = option(True, help="rotary + K/V cache write in one kernel (GPU)")
    check_windows: int = option(2, help="evaluation windows the fused and unfused runtime "
                                        "are compared on")

    def validate(self, path: str) -> None:
        positive(self, path, "check_windows")


class Fuse(Pass):
    name = "fuse"
    description = ("Plan kernel fusion for the runtime (stacked QKV and gate/up GEMMs, "
                   "fused residual + RMSNorm and SwiGLU), write the kernel table, and check "
                   "the fused model's logits against the unfused ones.")
    reads = ("model", "tokenizer")
    optional_reads = ("quantized",)
    writes = ("fusion",)
    Options = FuseOptions

    def run(self, ctx, options) -> PassResult:
        plan = {k: getattr(options, k) for k in DEFAULT_PLAN}
        table = kernel_table(ctx.info, ctx.target.weights.scheme, ctx.target.device, plan)
        check = lossless_check(ctx, plan, options.check_windows)
        fusion = {"plan": plan, "kernels": table, "check": check}
        metrics = {"stacked_gemms": sum(1 for row in table if row.get("fuses")),
                   "fused_kernels": sum(1 for row in table if row["kernel"].startswith(
                       ("triton _add", "triton _silu", "triton _rope"))), **check}
        return PassResult(outputs={"fusion": fusion}, metrics=metrics,
                          reports={"kernels.json": json_bytes(fusion)})


def lossless_check(ctx, plan: dict, windows: int) -> dict:
    """The runtime's logits with and without `plan` on a few evaluation windows."""
    from dwc.runtime.scoring import runtime_logits

    e = ctx.build.evaluation
    ids = token_windows(e.data, ctx.artifacts.tokenizer, windows, min(e.seq_len, 128))
    ids = torch.stack([w for w in ids if len(w) == len(ids[0])])
    quantized = ctx.artifacts.quantized
    weights = quantized.folder if quantized is not None else None
    model, device = ctx.artifacts.model, ctx.compute_device
    plain = runtime_logits(model, device, weights)(ids.to(device)).float()
    fused = runtime_logits(model, device, weights, fusion=plan)(ids.to(device)).float()
    scale = plain.abs().max().item()
    return {"max_logit_diff": round((fused - plain).abs().max().item() / scale, 6),
            "top1_agreement": round((fused.argmax(-1) == plain.argmax(-1)).float().mean().item(), 6),
            "device": device, "tokens": int(ids.numel())}
