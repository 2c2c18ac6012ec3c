"""The unified Hugging Face checkpoint NVIDIA ModelOpt exports (what TensorRT-LLM 1.x
loads): writing it with ModelOpt, and reading it back in PyTorch.

Layout (ModelOpt 0.47, `export_hf_checkpoint`): the original config.json plus
`quantization_config` (`quant_method: modelopt`), `hf_quant_config.json` (`producer`,
`quantization.quant_algo`, `kv_cache_quant_algo`, `exclude_modules`, `group_size`), and
safetensors under the Hugging Face tensor names:

- FP8 (`quant_algo: FP8`): each quantized Linear's `weight` in float8_e4m3fn with a
  scalar float32 `weight_scale` and `input_scale` (amax / 448); with an FP8 KV cache,
  `k_proj.k_scale` and `v_proj.v_scale`.
- INT4 AWQ (`W4A16_AWQ`): `weight` uint8, two signed 4-bit values per byte along the
  output dimension (row 2r in the low nibble, 2r + 1 in the high one), `weight_scale`
  [out, in / group] float32 (w = q * scale), and `pre_quant_scale` [in] (the input is
  multiplied by it) where AWQ's smoothing could not be folded into a preceding norm
  (o_proj, down_proj); for q/k/v and gate/up it is folded into the norms' weights.

Plain transformers cannot load this layout (FP8 loads silently wrong, INT4 fails on
shapes), so `load_model` is dwc's reader: it builds the model from config.json and puts
in each Linear the dequantized weight and, for FP8, the input quantization (x rounded
through FP8 with input_scale), the computation TensorRT-LLM performs; an FP8 KV cache is
simulated by rounding k_proj / v_proj outputs through FP8 with k_scale / v_scale
(TensorRT-LLM quantizes K after rotary; rotation mixes pairs of channels of the same
token, so the per-tensor scale holds, but the rounding differs slightly).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FP8_MAX = 448.0
ALGOS = {"fp8-w8a8": "FP8", "int4-w4a16": "W4A16_AWQ"}


def quantize_and_export(model, scheme: str, fp8_kv: bool, group_size: int | None,
                        windows: list, folder: Path) -> None:
    """ModelOpt's `mtq.quantize` (calibrating on `windows`, [s] token-id tensors) and
    `export_hf_checkpoint` into `folder`. `model` is changed in place (pass a copy)."""
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ModelOpt warns that transformers 5 is untested
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint

    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG if scheme == "fp8-w8a8" else mtq.INT4_AWQ_CFG)
    if scheme == "int4-w4a16" and group_size:
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
                entry["cfg"]["block_sizes"][-1] = group_size
    if fp8_kv:
        cfg["quant_cfg"] = cfg["quant_cfg"] + copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    device = next(model.parameters()).device

    def forward_loop(m):
        with torch.no_grad():
            for ids in windows:
                m(ids[None].to(device))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, cfg, forward_loop)
        export_hf_checkpoint(model, export_dir=folder)


def read_quant_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "hf_quant_config.json").read_text())["quantization"]


def load_model(folder: Path, device: str = "cpu", dtype=torch.bfloat16):
    """The exported checkpoint as a transformers model computing what TensorRT-LLM does
    (see the module docstring)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    quant = read_quant_config(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Built on the CPU (rotary buffers are computed at construction), then filled.
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    linears = {k[:-len(".weight")] for k, v in tensors.items()
               if k.endswith(".weight") and k[:-len(".weight")] + ".weight_scale" in tensors}
    state = {}
    for key, value in tensors.items():
        module, _, name = key.rpartition(".")
        if module in linears and name != "bias":
            if name == "weight":
                state[key] = dequantize(tensors, module, quant).to(dtype)
            continue
        state[key] = value.to(dtype)
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device).eval().requires_grad_(False)
    for name in linears:
        _hook(model.get_submodule(name), tensors, name, quant)
    return model


def dequantize(tensors: dict, module: str, quant: dict) -> torch.Tensor:
    """A quantized Linear's weight in float32, as the exported tensors define it."""
    w = tensors[f"{module}.weight"]
    scale = tensors[f"{module}.weight_scale"].float()
    if w.dtype == torch.float8_e4m3fn:
        return w.float() * (scale if scale.dim() == 0 else scale.reshape(-1, 1))
    if w.dtype == torch.uint8:
        q = unpack_int4(w)                                         # [out, in] in [-8, 7]
        group = q.shape[1] // scale.shape[1]
        return q.float() * scale.repeat_interleave(group, dim=1)
    raise ValueError(f"{module}.weight: unexpected dtype {w.dtype} for {quant['quant_algo']}")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out / 2, in] -> int8 [out, in]: low nibble row 2r, high nibble row 2r + 1,
    each a two's-complement 4-bit value."""
    low = (packed & 0x0F).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    low = torch.where(low >= 8, low - 16, low)
    high = torch.where(high >= 8, high - 16, high)
    out = torch.stack([low, high], dim=1)                          # [out / 2, 2, in]
    return out.reshape(-1, packed.shape[1]).to(torch.int8)


def fp8_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return ((x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
            * scale).to(x.dtype)


def _hook(linear, tensors: dict, name: str, quant: dict) -> None:
    """Input quantization (FP8), AWQ's pre-quant scale, and the FP8 KV cache rounding."""
    input_scale = tensors.get(f"{name}.input_scale")
    pre = tensors.get(f"{name}.pre_quant_scale")
    if input_scale is not None or pre is not None:
        s = input_scale.float().to(linear.weight.device) if input_scale is not None else None
        p = pre.to(linear.weight.device, linear.weight.dtype) if pre is not None else None

        def before(module, args):
            x = args[0]
            if p is not None:
                x = x * p
            if s is not None:
                x = fp8_round_trip(x, s)
            return (x,)

        linear.register_forward_pre_hook(before)
    kv = tensors.get(f"{name}.k_scale", tensors.get(f"{name}.v_scale"))
    if kv is not None and quant.get("kv_cache_quant_algo") == "FP8":
        kv_scale = kv.float().to(linear.weight.device)
        linear.register_forward_hook(lambda module, args, out: fp8_round_trip(out, kv_scale))
