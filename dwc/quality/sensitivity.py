"""How much error each quantized Linear adds, measured on calibration windows.

For every module llm-compressor quantized (it keeps float weights and quantizes weight
and input inside forward), the forward hook sees the input x and the quantized output
y_q, and computes the float output y = x W^T + b from the same input. The layer's error
is sum |y_q - y|^2 / sum |y|^2 over all calibration tokens: the local damage of that
layer alone (weight and activation quantization), independent of the layers before it.
"""

from __future__ import annotations

from dwc.quality.data import batches


def layer_errors(model, windows, batch_size: int = 4) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    sums: dict[str, list[float]] = {}
    hooks = []

    def hook(name):
        def fn(module, args, out):
            y = F.linear(args[0], module.weight, module.bias)       # [b, s, out] float path
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += (out.float() - y.float()).pow(2).sum().item()
            acc[1] += y.float().pow(2).sum().item()
        return fn

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and getattr(module, "quantization_scheme", None):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.inference_mode():
            for group in batches(windows, batch_size):
                model(torch.stack(group).to(model.device))
    finally:
        for h in hooks:
            h.remove()
    return {name: err / max(ref, 1e-30) for name, (err, ref) in sorted(sums.items())}
