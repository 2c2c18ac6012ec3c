"""The fp32 scratch buffer and zeroed counters that split kernels share on a device.

A split kernel (skinny_gemm_triton.py's split-K GEMM, paged_attention_triton.py's
split-KV decode) has each program write its partial result here and bump a counter; the
program that arrives last combines the partials and resets its counter to zero. Calls
run one after another on one stream (the runtime's case), so every kernel can use the
same buffer and counters.
"""

from __future__ import annotations

import torch

_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_retired: list[tuple[torch.Tensor, torch.Tensor]] = []  # CUDA graphs may still point at them


def workspace(device: torch.device, floats: int, counters: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's shared partial-sum buffer (>= `floats` float32) and zeroed counters
    (>= `counters` int32), grown on demand (the warm-up before each graph capture sizes
    them). Replaced buffers are kept alive: graphs captured with them (the target's,
    when the draft's capture grows them) go on using them, one after another on one
    stream as everything else."""
    ws, cnt = _workspaces.get(device, (None, None))
    if ws is None or ws.numel() < floats or cnt.numel() < counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split kernels: the workspace must be sized before graph capture")
        if ws is not None:
            _retired.append((ws, cnt))
        ws = torch.empty(max(floats, 0 if ws is None else ws.numel()), dtype=torch.float32,
                         device=device)
        cnt = torch.zeros(max(counters, 0 if cnt is None else cnt.numel()), dtype=torch.int32,
                          device=device)
        _workspaces[device] = (ws, cnt)
    return ws, cnt


_sm_counts: dict[torch.device, int] = {}


def multiprocessors(device: torch.device) -> int:
    """The device's SM count (132 on an H100 SXM / H200), read once."""
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device]
