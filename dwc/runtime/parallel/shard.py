"""Cutting a Decoder to its rank's shard: column- and row-parallel projections,
vocabulary-parallel embedding and head (parallel/__init__.py). Imports only the model;
`group` is the process's workers.Group (rank, size, all_reduce, gather_last_dim)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dwc.errors import BadInput
from dwc.runtime.model import ATTN_PROJ, MLP_PROJ
from dwc.runtime.parallel.layout import Layout, check_layout


ROW_PARALLEL = ("o_proj", "down_proj")


# -- cutting modules --------------------------------------------------------------------

def cut_linear(module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
               keep_bias: bool = True, device=None):
    """A copy of `module` on `device` (default: the module's) with only output `rows`
    (column-parallel) or input `cols` (row-parallel; the bias stays only where
    `keep_bias`). Copies, so the full weight can be freed. Kernel-backed FP8 / INT8:
    per-output-channel weight scales follow the rows; a row-parallel cut keeps them
    whole (every output channel is still there, as a partial sum); the static per-tensor activation scale is unchanged: quantizing with
    one scale is elementwise, so quantizing a rank's slice of the input gives that slice
    of the whole input quantized."""
    from dwc.runtime.layers.linear import Fp8Linear, Int8Linear

    def cut(w):                                                         # w: [out, in]
        w = w[rows] if rows is not None else w[:, cols.to(w.device)]
        return w.contiguous().to(device)

    here = _device_of(module)
    device = device or here
    if rows is not None:
        rows = rows.to(here)
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias = bias.detach().to(here)
        bias = bias[rows].to(device, copy=True) if rows is not None else \
            (bias.to(device, copy=True) if keep_bias else None)
    if type(module) is torch.nn.Linear and getattr(module, "quantization_scheme", None) is None:
        w = cut(module.weight.detach())
        out = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta",
                              dtype=w.dtype)  # no allocation: the cut tensors replace them
        out.weight = torch.nn.Parameter(w, requires_grad=False)
        if bias is not None:
            out.bias = torch.nn.Parameter(bias, requires_grad=False)
        return out.requires_grad_(False)
    if type(module) is Fp8Linear:
        scale = module.scale_b.view(-1).to(device)                        # [out]
        return Fp8Linear(cut(module.weight_t.t()), scale[rows.to(device)] if rows is not None
                         else scale, module.input_scale.to(device), bias)
    if type(module) is Int8Linear:
        scale = module.scale_w.view(-1).to(device)                        # [out]
        static = None if module.input_scale is None else module.input_scale.to(device)
        return Int8Linear(cut(module.weight_t.t()), scale[rows.to(device)] if rows is not None
                          else scale, static, bias)
    raise BadInput(f"tensor parallelism cuts plain Linears and the GPU's FP8 / INT8 kernels; "
                   f"{type(module).__name__} (a quantized module on the CPU, or INT4) is not "
                   "supported")


def _device_of(module) -> torch.device:
    w = getattr(module, "weight", None)
    return (w if w is not None else module.weight_t).device


class VocabParallelEmbedding(torch.nn.Module):
    def __init__(self, embed: torch.nn.Embedding, layout: Layout, group):
        super().__init__()
        rows = layout.vocab_rows
        self.weight = torch.nn.Parameter(embed.weight.detach()[rows.start:rows.stop].clone(),
                                         requires_grad=False)            # [vocab / N, hidden]
        self.lo, self.hi = rows.start, rows.stop
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:               # ids: [t]
        inside = (ids >= self.lo) & (ids < self.hi)
        h = F.embedding(torch.where(inside, ids - self.lo, 0), self.weight)  # [t, hidden]
        return self.group.all_reduce(h.masked_fill(~inside[:, None], 0))


class VocabParallelHead(torch.nn.Module):
    def __init__(self, head: torch.nn.Linear, layout: Layout, group):
        super().__init__()
        if type(head) is not torch.nn.Linear or head.bias is not None:
            raise BadInput(f"tensor parallelism needs a plain lm_head without bias, not "
                           f"{type(head).__name__}")
        rows = layout.vocab_rows
        w = head.weight.detach()[rows.start:rows.stop]
        pad = layout.vocab_per_rank - w.shape[0]  # the last rank's slice may be short
        self.weight = torch.nn.Parameter(F.pad(w, (0, 0, 0, pad)).contiguous(),
                                         requires_grad=False)            # [vocab / N, hidden]
        self.vocab = layout.vocab
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:                 # x: [rows, hidden]
        local = F.linear(x, self.weight)                                # [rows, vocab / N]
        return self.group.gather_last_dim(local)[:, :self.vocab]         # rank 0: [rows, vocab]


def shard_decoder(decoder, group) -> None:
    """Cut a Decoder (after use_kernels and fuse, before its cache is made) down to rank
    `group.rank`'s shard, in place, and move what is left to its device. The checkpoint
    model's own projections are replaced by the shards (or dropped, where stacked), so
    the full weights can be freed. Tensor-parallel runners load the checkpoint and
    build the GPU's quantized kernels on the CPU and cut them there, so a GPU only ever
    holds its rank's share."""
    d = decoder
    check_layout(d.num_heads, d.num_kv_heads, d.intermediate_size, group.size)
    layout = Layout(group.rank, group.size, d.num_heads, d.num_kv_heads, d.head_dim,
                    d.intermediate_size, d.embed.weight.shape[0])
    for layer, proj in zip(d.layers, d.proj):
        for name, module in list(proj.items()):
            if name in ROW_PARALLEL:
                proj[name] = cut_linear(module, cols=layout.cols(name),
                                        keep_bias=group.rank == 0, device=d.device)
            else:
                proj[name] = cut_linear(module, rows=layout.rows(name), device=d.device)
        for part, names in ((layer.self_attn, ATTN_PROJ), (layer.mlp, MLP_PROJ)):
            for n in names:
                setattr(part, n, proj.get(n))
    d.embed = VocabParallelEmbedding(d.embed, layout, group)
    d.lm_head = VocabParallelHead(d.lm_head, layout, group)
    d.num_heads = len(layout.heads)
    d.num_kv_heads = len(layout.kv_heads)
    d.reduce = group.all_reduce
    for module in (d.layers, d.embed, d.lm_head, d.final_norm):  # norms, vocabulary shards
        module.to(d.device)
    if d.device == "cuda":
        torch.cuda.empty_cache()
