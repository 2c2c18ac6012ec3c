"""TensorRT-LLM bundles: a ModelOpt-quantized Hugging Face checkpoint (checkpoint.py)
and the LLM API options and trtllm-serve command (emit.py). TensorRT-LLM does not run
here, so the quality gate reads the exported checkpoint back into transformers."""

from __future__ import annotations

from dwc.backends.base import Backend, ServingContainer
from dwc.constants import TRTLLM_IMAGE
from dwc.errors import BadInput


class TensorRtLlm(Backend):
    name = "tensorrt-llm"
    description = "a ModelOpt checkpoint with the LLM API options for trtllm-serve"
    own_passes = ("modelopt-quantize",)

    def emit(self, writer, ctx) -> None:
        from dwc.backends.tensorrt_llm.emit import emit

        emit(writer, ctx)

    def eval_logits(self, ctx, model, kv_plan):
        """The exported checkpoint through dwc's reader of it (dequantized weights, FP8
        input and KV rounding as hooks), in transformers."""
        from dwc.quality.metrics import hf_logits

        return hf_logits(model)

    def bench(self, bundle, manifest, cfg, speculation):
        raise BadInput(f"{bundle}: a tensorrt-llm bundle runs in TensorRT-LLM, not here; "
                       "measure it with `trtllm-bench` where TensorRT-LLM runs")

    def containers(self, manifest: dict, port: int) -> list[ServingContainer]:
        """trtllm-serve as serve/trtllm-serve.sh runs it. Its Prometheus metrics are at
        /prometheus/metrics; TensorRT-LLM 1.x exports no gauge of waiting requests, so the
        queue is the rate of its queue-time sum (mean requests waiting, by Little's law),
        named by the metrics adapter (docs/DEPLOY.md)."""
        from dwc.backends.tensorrt_llm.emit import serve_args

        return [ServingContainer("trtllm", TRTLLM_IMAGE,
                                 ["trtllm-serve", *serve_args("0.0.0.0", port)], port,
                                 "/health", "/prometheus/metrics", "trtllm_queue_depth")]


TENSORRT_LLM = TensorRtLlm()
