"""torch-triton bundles: compressed-tensors (or bf16) safetensors that dwc's own runtime
serves (emit.py; vLLM loads them too) and `dwc bench` through that runtime (bench.py)."""

from __future__ import annotations

from pathlib import Path

from dwc.backends.base import Backend, BenchRun, ServingContainer
from dwc.constants import BUNDLE_MOUNT, DWC_IMAGE, MAX_WAITING, VLLM_IMAGE
from dwc.errors import BadInput, TargetError
from dwc.formats.manifest import RUNTIME_BACKEND


class TorchTriton(Backend):
    name = RUNTIME_BACKEND
    description = "dwc's PyTorch + Triton runtime (`dwc serve`); vLLM loads the same model/"
    tensor_parallel = True

    def check_model(self, target, info) -> None:
        super().check_model(target, info)
        if target.tensor_parallel > 1:
            _check_split(target, info)

    def emit(self, writer, ctx) -> None:
        from dwc.backends.torch_triton.emit import emit

        emit(writer, ctx)

    def eval_logits(self, ctx, model, kv_plan):
        """The model through dwc's runtime: its decoder, paged attention, GPU kernels, the
        fusion plan when there is one and, with a KV plan, its KV cache dtype."""
        from dwc.runtime.scoring import runtime_logits

        quantized = ctx.artifacts.quantized
        fp8_kv = kv_plan is not None and kv_plan["dtype"] == "fp8_e4m3"
        return runtime_logits(model, ctx.compute_device,
                              weights_dir=quantized.folder if quantized is not None else None,
                              kv_dtype="fp8_e4m3" if fp8_kv else None,
                              kv_scales=kv_plan.get("kv_scales") if fp8_kv else None,
                              fusion=(ctx.artifacts.fusion or {}).get("plan"))

    def bench(self, bundle: Path, manifest: dict, cfg, speculation: str) -> BenchRun:
        from dwc.backends.torch_triton.bench import bench_run

        return bench_run(bundle, manifest, cfg, speculation)

    def alternative_serving(self, manifest: dict) -> str | None:
        from dwc.backends.torch_triton.emit import vllm_command

        return vllm_command(manifest)

    def containers(self, manifest: dict, port: int) -> list[ServingContainer]:
        """`dwc serve` (its /health, its /metrics: dwc/serving/http_server.py) and vLLM on
        the same model/ with serve/vllm.sh's arguments (vLLM's /health, /metrics and its
        gauge of waiting requests, `vllm:num_requests_waiting`)."""
        from dwc.backends.torch_triton.emit import vllm_serve_args

        dwc = ServingContainer("dwc", DWC_IMAGE, ["dwc", "serve", BUNDLE_MOUNT, "--host",
                                                  "0.0.0.0", "--port", str(port)],
                               port, "/health", "/metrics", "dwc_queue_depth",
                               dwc_metrics=True, max_waiting=MAX_WAITING)
        vllm = ServingContainer("vllm", VLLM_IMAGE,
                                ["vllm", "serve", *vllm_serve_args(manifest, "0.0.0.0", port)],
                                port, "/health", "/metrics", "vllm_num_requests_waiting")
        return [dwc, vllm]


def _check_split(target, info) -> None:
    """The model splits over target.tensor_parallel ranks, and each rank's quantized
    slices keep the kernels' alignment."""
    from dwc.runtime.parallel.layout import check_layout

    try:
        check_layout(info.num_heads, info.num_kv_heads, info.intermediate_size,
                     target.tensor_parallel)
    except BadInput as e:
        raise TargetError(f"target {target.name}: {e.message}") from None
    multiple = target.weights.group_size or (16 if target.weights.scheme != "none" else 1)
    share = info.intermediate_size // target.tensor_parallel
    if share % multiple:
        raise TargetError(f"target {target.name}: intermediate_size / tensor_parallel = "
                          f"{share} is not a multiple of {multiple}, which "
                          f"{target.weights.scheme} needs")


TORCH_TRITON = TorchTriton()
