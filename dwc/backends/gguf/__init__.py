"""GGUF bundles for llama.cpp on the CPU: the file written by dwc and quantized by
llama.cpp itself (file.py, llama.py), llama.cpp run in a child process (child.py) for
the quality gate and `dwc bench` (bench.py)."""

from __future__ import annotations

from pathlib import Path

from dwc.backends.base import Backend, BenchRun


class Gguf(Backend):
    name = "gguf"
    description = "one GGUF file for llama.cpp (llama-server, Ollama), quantized by llama.cpp"
    own_passes = ("gguf-export",)

    def check_model(self, target, info) -> None:
        from dwc.backends.gguf.file import check_representable

        # llama.cpp's quantizer handles rows that K-quants cannot split (it falls back to
        # another type for that tensor): no size rule here.
        check_representable(info.path, info.config)

    def emit(self, writer, ctx) -> None:
        from dwc.backends.gguf.llama import emit

        emit(writer, ctx)

    def eval_logits(self, ctx, model, kv_plan):
        """The bundle's own file, run by llama.cpp."""
        from dwc.backends.gguf.llama import llama_logits

        return llama_logits(ctx.artifacts.quantized.path, ctx.build.evaluation.seq_len)

    def bench(self, bundle: Path, manifest: dict, cfg, speculation: str) -> BenchRun:
        from dwc.backends.gguf.bench import bench_run

        return bench_run(bundle, manifest, cfg)


GGUF = Gguf()
