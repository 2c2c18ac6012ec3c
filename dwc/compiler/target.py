"""Targets: hardware + backend + quantization scheme + pass list, read from
`targets/*.yaml`.

A target is data, not code (README.md, "Targets"). `check_model` refuses a target that
cannot work
on a given model before any pass runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Literal, Optional

import yaml

from dwc import backends
from dwc.model.checkpoint import ModelInfo
from dwc.config import from_dict, option, positive
from dwc.errors import TargetError

KV_DTYPES = Literal["bfloat16", "float16", "float32", "fp8_e4m3"]


@dataclass
class Hardware:
    name: str = option(help="the device, as people name it")
    memory_gb: float = option(help="device memory in GB (1e9 bytes)")
    memory_bandwidth_gbs: float = option(help="measured or rated read bandwidth, GB/s")
    peak_tflops: dict[str, float] = option(help="peak dense TFLOP/s per dtype")
    usd_per_hour: float = option(help="price of one device-hour, for cost per token")
    compute_capability: Optional[str] = option(None, help="CUDA compute capability, e.g. '9.0'")

    def validate(self, path: str) -> None:
        positive(self, path, "memory_gb", "memory_bandwidth_gbs", "usd_per_hour", error=TargetError)


@dataclass
class Weights:
    scheme: Literal["none", "fp8-w8a8", "int8-w8a8", "int4-w4a16", "gguf-f16", "gguf-q8_0",
                    "gguf-q4_k_m"] = option(
        help="quantization scheme of the linear layers (gguf-*: llama.cpp's types)")
    dtype: Literal["bfloat16", "float16", "float32"] = option(
        help="dtype of the weights that are not quantized (and of activations)")
    method: Optional[Literal["rtn", "gptq", "awq"]] = option(
        None, help="default quantization algorithm (quantize.method overrides it)")
    group_size: Optional[int] = option(None, help="weights per scale for grouped schemes")
    smoothquant: bool = option(False, help="SmoothQuant before quantizing (int8-w8a8)")


@dataclass
class Target:
    name: str = option(help="target name, as given to --target")
    description: str = option(help="one line for `dwc targets`")
    backend: str = option(help="serving backend of the bundle: " + ", ".join(backends.BACKENDS))
    device: Literal["cpu", "cuda"] = option(help="where the runtime runs")
    hardware: Hardware = option(help="the machine's figures")
    weights: Weights = option(help="weight format")
    kv_cache_dtype: KV_DTYPES = option(help="KV cache dtype")
    passes: list[str] = option(help="default pass list, in order")
    tensor_parallel: int = option(
        1, help="GPUs one model is split across (tensor parallelism, torch-triton only); "
                "`hardware` describes one of them")

    def validate(self, path: str) -> None:
        if self.backend not in backends.BACKENDS:
            raise TargetError(f"backend: {self.backend!r} is not one of "
                              f"{', '.join(backends.BACKENDS)}")
        backend = backends.get(self.backend)
        if self.tensor_parallel < 1:
            raise TargetError("tensor_parallel: must be at least 1")
        if self.tensor_parallel > 1 and not backend.tensor_parallel:
            raise TargetError(f"tensor_parallel: {self.backend} bundles are not split by dwc; "
                              "tensor parallelism is for the torch-triton runtime")
        for other in backends.BACKENDS.values():
            foreign = [p for p in self.passes if p in other.own_passes and other is not backend]
            if foreign:
                raise TargetError(f"passes: {foreign[0]} is a pass of {other.name} bundles, "
                                  f"not {self.backend}")
        if self.tensor_parallel > 1 and self.weights.scheme == "int4-w4a16":
            raise TargetError("tensor_parallel: INT4 (W4A16) weights are not split yet")

    def check_model(self, info: ModelInfo) -> None:
        """Refuse, in one line, a model this target cannot compile."""
        if "head_dim" not in info.config and info.hidden_size % info.num_heads:
            raise TargetError(f"target {self.name}: hidden_size {info.hidden_size} is not "
                              f"divisible by num_attention_heads {info.num_heads}")
        if info.head_dim % 2:
            raise TargetError(f"target {self.name}: head size {info.head_dim} is odd; "
                              "rotary embeddings need an even head size")
        backends.get(self.backend).check_model(self, info)

    def summary(self) -> dict:
        return {"name": self.name, "backend": self.backend, "device": self.device,
                "weights": self.weights.scheme, "dtype": self.weights.dtype,
                "kv_cache": self.kv_cache_dtype, "tensor_parallel": self.tensor_parallel,
                "description": self.description}


def target_names() -> list[str]:
    files = resources.files("dwc.targets").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml"))


def load_target(name: str) -> Target:
    names = target_names()
    if name not in names:
        raise TargetError(f"unknown target {name!r} (known: {', '.join(names)})")
    text = resources.files("dwc.targets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    where = f"targets/{name}.yaml"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TargetError(f"{where}: invalid YAML ({e})") from None
    try:
        target = from_dict(Target, data, "", error=TargetError)
    except TargetError as e:
        raise TargetError(f"{where}: {e.message}") from None
    if target.name != name:
        raise TargetError(f"{where}: name {target.name!r} differs from the file name")
    return target


def all_targets() -> list[Target]:
    return [load_target(n) for n in target_names()]
