"""TensorRT-LLM bundles: a ModelOpt-quantized Hugging Face checkpoint (checkpoint.py)
and the LLM API options and trtllm-serve command (emit.py). TensorRT-LLM does not run
here, so the quality gate reads the exported checkpoint back into transformers."""

from __future__ import annotations

from dwc.backends.base import Backend
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


TENSORRT_LLM = TensorRtLlm()
