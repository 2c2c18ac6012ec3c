"""The decoder the runtime runs: Llama / Mistral / Qwen2 over a paged KV cache.

Weights come from the bundle's model/ as transformers loads it: the embedding, the norms'
weights, the rotary frequencies, and the Linear modules themselves. A bf16 bundle's Linears
are plain nn.Linear; a compressed-tensors bundle's Linears are compressed-tensors modules,
whose forward is that library's reference quantized matmul (the CPU path). The runtime
owns everything between them: batching of all sequences' tokens into one matrix per
projection, rotary, paged attention, residuals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dwc.runtime.kernels.prefill_tiles import PrefillGroup
from dwc.runtime.layers.attention import paged_attention, prompt_attention, write_kv
from dwc.runtime.layers.norm import add_rms_norm, rms_norm, silu_mul
from dwc.runtime.layers.rotary import Rotary, apply_rotary


ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Batch:
    """One step's input, flattened over its chunks."""

    input_ids: torch.Tensor        # [tokens]
    positions: torch.Tensor        # [tokens]
    slots: torch.Tensor            # [tokens] cache slots the new K/V go to
    chunks: list                   # per chunk: (offset in tokens, length, start, seq_slots)
    sample_rows: torch.Tensor      # [rows whose logits are returned] token rows
    decode: "DecodeGroup | None" = None  # one-token chunks served by the GPU kernel
    prompts: list = None           # PromptGroups: whole prompts attended in one call each
    prefill: "PrefillGroup | None" = None  # GPU: every longer chunk, in one kernel


@dataclass
class PromptGroup:
    """Whole-prompt chunks of similar length, right-padded into one [B, L] batch."""

    gather: torch.Tensor           # [B, L] token rows (padding repeats a real row)
    slots: torch.Tensor            # [B, L] their cache slots
    flat: torch.Tensor             # [valid tokens] b * L + i of each real (not padding) row
    rows: torch.Tensor             # [valid tokens] their token rows, in the order of flat


@dataclass
class DecodeGroup:
    rows: torch.Tensor | None      # [n] token rows the kernel serves (None: every row)
    block_tables: torch.Tensor     # [n, max_blocks] int32
    context_lens: torch.Tensor     # [n] int32, tokens in the cache after this step
    page: int                      # block size


def _whole(x: torch.Tensor) -> torch.Tensor:
    return x


class Decoder:
    def __init__(self, hf_model, device):
        cfg = hf_model.config
        inner = hf_model.model
        self.embed = inner.embed_tokens
        self.layers = inner.layers
        self.final_norm = inner.norm
        self.lm_head = hf_model.lm_head
        self.rotary = Rotary(inner.rotary_emb, device)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.intermediate_size = cfg.intermediate_size
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.dtype = self.embed.weight.dtype
        self.kv_scales = [(1.0, 1.0)] * len(self.layers)  # set by the runner for FP8 caches
        self.device = device
        self.add_rms_norm = add_rms_norm  # the fused kernels replace these (fuse())
        self.silu_mul = silu_mul
        self.rope_kv = None  # fused rotary + KV write (GPU), set by fuse()
        # GPU: the fused norm / SwiGLU kernels write FP8 for the FP8 GEMM that reads
        # them (fuse(); _fp8_input)
        self.fp8_norm_out = self.fp8_silu_out = False
        # Sums the row-parallel projections' partial outputs across tensor-parallel ranks
        # (set by parallel/shard.py's shard_decoder); one process has the whole sum already.
        self.reduce = _whole
        # The projections each layer calls: the checkpoint's modules, or kernel-backed
        # replacements (use_kernels) on the GPU.
        self.proj = [{**{n: getattr(layer.self_attn, n) for n in ATTN_PROJ},
                      **{n: getattr(layer.mlp, n) for n in MLP_PROJ}} for layer in self.layers]
        # Layers whose outputs a step keeps for an EAGLE head (dwc/runtime/eagle.py):
        # `tapped` [tokens, len(taps) * hidden] after each step (eager, or replayed by the
        # graphs, which keep them when the taps were set before capture).
        self.taps: tuple[int, ...] = ()
        self.tapped: torch.Tensor | None = None

    def use_kernels(self, model_dir, device, plan: dict | None = None) -> int:
        """Swap compressed-tensors Linears for the GPU kernels, stacking q/k/v and
        gate/up into one kernel each when `plan` says so; returns how many projections
        the kernels serve."""
        from dwc.runtime.fusion import GROUPS, merge_raw
        from dwc.runtime.layers.linear import gpu_linear, raw_tensors

        tensors = raw_tensors(model_dir, device)
        swapped = 0
        for i, proj in enumerate(self.proj):
            def raw(name):
                part = "self_attn" if name in ATTN_PROJ else "mlp"
                return tensors.get(f"model.layers.{i}.{part}.{name}")

            for key, names in GROUPS.items():
                if not (plan or {}).get(key) or any(raw(n) is None for n in names):
                    continue
                schemes = [getattr(proj[n], "quantization_scheme", None) for n in names]
                if any(sc != schemes[0] for sc in schemes):
                    continue
                merged = merge_raw([raw(n) for n in names])
                biases = [proj[n].bias for n in names]
                bias = torch.cat(biases) if all(b is not None for b in biases) else None
                kernel = gpu_linear(proj[names[0]], merged, bias) if merged and \
                    (bias is not None or all(b is None for b in biases)) else None
                if kernel is not None:
                    for n in names:
                        del proj[n]
                    proj[key] = kernel
                    swapped += len(names)
            for name, module in list(proj.items()):
                kernel = gpu_linear(module, raw(name)) if raw(name) is not None else None
                if kernel is not None:
                    proj[name] = kernel
                    swapped += 1
        return swapped

    def use_skinny_gemm(self) -> int:
        """GPU: serve the plain bf16 Linears (stacked ones included; call after fuse) at
        decode sizes with the split-K kernel (layers/linear.py SkinnyLinear); returns how
        many it wraps."""
        from dwc.runtime.layers.linear import SkinnyLinear

        wrapped = 0
        for proj in self.proj:
            for name, module in proj.items():
                if type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16:
                    proj[name] = SkinnyLinear(module)
                    wrapped += 1
        return wrapped

    def fuse(self, plan: dict) -> None:
        """Apply a fusion plan (see dwc.runtime.fusion): one GEMM for q/k/v and one for
        gate/up where the modules allow it (use_kernels fuses the GPU's quantized ones),
        and the fused residual + RMSNorm and SwiGLU kernels on the GPU."""
        from dwc.runtime.fusion import fuse_linears

        for proj in self.proj:
            if plan.get("qkv") and "qkv" not in proj:
                fuse_linears(proj, ("q_proj", "k_proj", "v_proj"), "qkv")
            if plan.get("gate_up") and "gate_up" not in proj:
                fuse_linears(proj, ("gate_proj", "up_proj"), "gate_up")
        if self.device != "cuda":
            return
        from dwc.runtime.kernels import fused_triton

        if plan.get("norm_residual"):
            self.add_rms_norm = fused_triton.add_rms_norm
            self.fp8_norm_out = True
        if plan.get("silu_mul"):
            self.silu_mul = fused_triton.silu_mul
            self.fp8_silu_out = True
        half = self.head_dim // 2
        if plan.get("rope_kv") and self.head_dim % 2 == 0 and half & (half - 1) == 0:
            self.rope_kv = fused_triton.rope_kv  # the kernel needs power-of-two halves

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: list[torch.Tensor]) -> torch.Tensor:
        """Logits [rows, vocab] of the batch's sample rows: the pieces between attention
        calls (head, between, tail) with each layer's attention core between them; the
        piecewise CUDA graphs (piecewise_graphs.py) replay the same pieces."""
        q, residual, cos, sin = self.head(batch.input_ids, batch.positions, batch.slots, cache)
        kept = {}  # layer -> its output (the residual stream after it), for self.taps
        for i in range(len(self.layers)):
            attn = self.attend(i, q, batch, cache[i])
            if i + 1 < len(self.layers):
                q, residual = self.between(i + 1, attn, residual, cos, sin, batch.slots, cache)
                if i in self.taps:
                    kept[i] = residual
        hidden = self.tail(attn, residual)
        if self.taps:
            kept[len(self.layers) - 1] = hidden
            self.tapped = torch.cat([kept[i] for i in self.taps], -1)
        return self.logits(hidden, batch.sample_rows)

    # The pieces. The residual stream is added inside the next norm (add_rms_norm), so a
    # fused kernel can do both. Every piece is row-independent: a row's output depends on
    # that row's input only, so padding rows (captured sizes) cannot change real rows.

    def head(self, ids, positions, slots, cache, q_out=None):
        """Embedding, rotary tables, and layer 0 up to its attention: (q, residual, cos, sin)."""
        h = self.embed(ids)                                              # [t, hidden]
        cos, sin = self.rotary.cos_sin(positions, h.dtype)
        q, residual = self._start(0, h, None, cos, sin, slots, cache[0], q_out)
        return q, residual, cos, sin

    def between(self, i, attn, residual, cos, sin, slots, cache, q_out=None):
        """Layer i-1 after its attention, then layer i up to its attention: (q, residual)."""
        h, residual = self._finish(i - 1, attn, residual)
        return self._start(i, h, residual, cos, sin, slots, cache[i], q_out)

    def tail(self, attn, residual) -> torch.Tensor:
        """The last layer after its attention: the hidden states [t, hidden] before the
        final norm."""
        h, residual = self._finish(len(self.layers) - 1, attn, residual)
        return h + residual

    def logits(self, hidden, rows) -> torch.Tensor:
        return self.lm_head(rms_norm(hidden[rows], self.final_norm.weight, self.eps)).float()

    def _fp8_input(self, fused: bool, proj: dict, key: str, rows: int):
        """The static input scale of proj[key] when it is an FP8 Linear that takes the
        `_scaled_mm` path at `rows` tokens and a fused kernel writes its input: that
        kernel then quantizes as it writes (fused_triton.py), and the Linear skips its own
        quantize_fp8. Else None."""
        if not fused or self.dtype != torch.bfloat16:
            return None
        from dwc.runtime.layers.linear import Fp8Linear

        module = proj.get(key)
        if isinstance(module, Fp8Linear) and not module.takes_skinny(rows):
            return module.input_scale
        return None

    def _start(self, i, h, residual, cos, sin, slots, layer_cache, q_out):
        scale = self._fp8_input(self.fp8_norm_out, self.proj[i], "qkv", h.shape[0])
        norm = self.layers[i].input_layernorm.weight
        x, residual = self.add_rms_norm(h, residual, norm, self.eps) if scale is None else \
            self.add_rms_norm(h, residual, norm, self.eps, scale)
        q, k, v = self._qkv(self.proj[i], x)
        if self.rope_kv is not None:
            return self.rope_kv(q, k, v, cos, sin, slots, layer_cache, self.kv_scales[i],
                                out=q_out), residual
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        write_kv(layer_cache, slots, k, v, self.kv_scales[i])
        return (q if q_out is None else q_out.copy_(q)), residual

    def _finish(self, i, attn, residual):
        t = attn.shape[0]
        proj = self.proj[i]
        h = self.reduce(proj["o_proj"](attn.view(t, self.num_heads * self.head_dim)))
        scale = self._fp8_input(self.fp8_norm_out, proj, "gate_up", t)
        norm = self.layers[i].post_attention_layernorm.weight
        x, residual = self.add_rms_norm(h, residual, norm, self.eps) if scale is None else \
            self.add_rms_norm(h, residual, norm, self.eps, scale)
        return self.reduce(self._mlp(proj, x)), residual

    def _mlp(self, proj, x) -> torch.Tensor:
        if "gate_up" in proj:
            scale = self._fp8_input(self.fp8_silu_out, proj, "down_proj", x.shape[0])
            up = proj["gate_up"](x)
            return proj["down_proj"](self.silu_mul(up) if scale is None else
                                     self.silu_mul(up, scale))
        return proj["down_proj"](torch.nn.functional.silu(proj["gate_proj"](x)) *
                                 proj["up_proj"](x))

    def _qkv(self, proj, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if "qkv" in proj:
            q, k, v = proj["qkv"](x).split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = proj["q_proj"](x), proj["k_proj"](x), proj["v_proj"](x)
        return (q.reshape(t, self.num_heads, self.head_dim),
                k.reshape(t, self.num_kv_heads, self.head_dim),
                v.reshape(t, self.num_kv_heads, self.head_dim))

    def attend(self, i, q, batch: Batch, layer_cache, out=None) -> torch.Tensor:
        """Layer i's attention core over the paged cache (the K/V of this step already
        written): [t, heads, d], into `out` when given (every real row is written)."""
        scales = self.kv_scales[i]
        out = torch.empty_like(q) if out is None else out
        if batch.decode is not None:
            from dwc.runtime.kernels.paged_attention_triton import paged_decode

            dg = batch.decode
            paged_decode(q, layer_cache, dg.block_tables, dg.context_lens, dg.page,
                         self.scale, scales, out=out, rows=dg.rows)
        if batch.prefill is not None:
            from dwc.runtime.kernels.paged_prefill_triton import paged_prefill

            paged_prefill(q, layer_cache, batch.prefill, self.scale, scales, out)
        for pg in batch.prompts or ():
            out[pg.rows] = prompt_attention(q[pg.gather], layer_cache, pg.slots, pg.flat,
                                            self.scale, scales)
        for offset, length, start, seq_slots in batch.chunks:
            out[offset:offset + length] = paged_attention(
                q[offset:offset + length], layer_cache, seq_slots, start, self.scale, scales)
        return out
