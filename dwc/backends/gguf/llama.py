"""The gguf backend: llama.cpp's quantizer (through llama-cpp-python), the imatrix made
from dwc's calibration statistics, llama.cpp as the model for evaluation and bench, and
the bundle's model/ (one .gguf) and serve/ (llama-server command line, Ollama Modelfile).

llama.cpp's importance matrix is, for every matmul weight, the mean squared activation of
each input column over calibration text: exactly what the `calibrate` pass records
(`ActivationStats.mean_sq`, per Linear input). llama-cpp-python exposes
`llama_model_quantize` with `params.imatrix`, a NULL-terminated array of {tensor name,
float*, size}; that is what `llama-quantize --imatrix` hands the same function after
reading the file, so the result is what llama.cpp itself would produce (checked byte for
byte against the CLI while this was built).
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

import numpy as np

from dwc.backends.gguf import child as gguf_child
from dwc.backends.gguf.child import quiet
from dwc.bundle.writer import BundleWriter
from dwc.errors import DwcError
from dwc.formats import manifest as mf

# llama.cpp's file types (enum llama_ftype) for the targets' weight formats.
FTYPES = {"f16": 1, "q8_0": 7, "q4_k_m": 15}
USES_IMATRIX = ("q4_k_m",)  # llama.cpp's K-quant types weigh their rounding by it
# llama.cpp's CPU weight repacking (llama_model_params.use_extra_bufts; `--no-repack` on
# llama-server): off, in dwc's own runs and in the bundle's launch files. It crashed
# llama.cpp 0.3.36 on a Q8_0 Qwen2 (FACTS.md, 2026-12-03); why always: README, "GGUF
# repacking" (the measured cost, and the machines where it repacks what).
REPACK = False
GGUF_FILE = "model.gguf"
SERVE_DIR = "serve"
# Hugging Face Linear names -> llama.cpp tensor kinds (gguf.MODEL_TENSOR attribute names).
LINEAR_KINDS = {"self_attn.q_proj": "ATTN_Q", "self_attn.k_proj": "ATTN_K",
                "self_attn.v_proj": "ATTN_V", "self_attn.o_proj": "ATTN_OUT",
                "mlp.gate_proj": "FFN_GATE", "mlp.up_proj": "FFN_UP",
                "mlp.down_proj": "FFN_DOWN"}

def imatrix_entries(mean_sq: dict) -> dict[str, np.ndarray]:
    """Calibration mean squares keyed by Linear name -> llama.cpp tensor name. Q/K row
    permutation does not touch columns, so the statistics apply unchanged."""
    import gguf

    from dwc.backends.gguf.file import tensor_name

    out = {}
    for name, values in mean_sq.items():
        parts = name.split(".")
        if len(parts) < 5 or parts[0] != "model" or parts[1] != "layers":
            continue
        kind = LINEAR_KINDS.get(".".join(parts[3:5]))
        if kind is None:
            continue
        array = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
        out[tensor_name(getattr(gguf.MODEL_TENSOR, kind), int(parts[2]))] = array
    return out


def quantize(src: Path, dst: Path, ftype: str, imatrix: dict[str, np.ndarray] | None,
             threads: int = 0) -> None:
    """llama.cpp's quantizer: F16 `src` -> `dst` of `ftype`, with the imatrix when given
    (in a child process: a crash there is an error, not the end of dwc)."""
    gguf_child.run(f"quantizing to {ftype.upper()}", src, _quantize_here, src, dst, ftype,
                   imatrix, threads)


def _quantize_here(src: Path, dst: Path, ftype: str, imatrix: dict[str, np.ndarray] | None,
                   threads: int) -> None:
    import os

    from llama_cpp import llama_cpp as L

    quiet()
    params = L.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads or os.cpu_count() or 1
    keep = []
    if imatrix:
        entries = (L.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            keep.append(name.encode())
            entries[i].name = keep[-1]
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        entries[len(imatrix)].name = None  # the terminator
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(L.llama_model_imatrix_data))
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise DwcError(f"{src}: llama.cpp's quantizer failed ({ftype}, code {rc})")


def open_model(path: Path, n_ctx: int, logits_all: bool = False, threads: int | None = None,
               repack: bool = REPACK):
    """llama.cpp's model and context on `path`, in this process (callers in dwc run it in
    a child: gguf_child). `repack`: llama.cpp's CPU weight repacking (use_extra_bufts)."""
    from llama_cpp import Llama

    quiet()
    with _model_params(use_extra_bufts=repack):
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                     logits_all=logits_all, verbose=False, n_threads=threads)


@contextlib.contextmanager
def _model_params(**fields):
    """llama-cpp-python's `Llama` has no argument for some llama_model_params fields (the
    repacking switch among them); it fills its params from llama_model_default_params()
    once, while constructing, so defaults with `fields` set are handed to it then."""
    from llama_cpp import llama_cpp as L

    default = L.llama_model_default_params

    def params():
        p = default()
        for name, value in fields.items():
            setattr(p, name, value)
        return p

    L.llama_model_default_params = params
    try:
        yield
    finally:
        L.llama_model_default_params = default


def llama_logits(path: Path, seq_len: int):
    """An ids [b, s] -> logits [b, s, vocab] function running the GGUF file in llama.cpp
    (each window evaluated from an empty cache, as the reference sees it), in one child
    process that keeps the model open between calls; `.close()` ends it."""
    import torch

    child = gguf_child.LlamaProcess("evaluating", path)

    def fn(ids):
        # looked up at each call, so a test can send the child another function
        return torch.from_numpy(child.call(_window_logits, str(path), seq_len, ids.tolist()))

    fn.close = child.close
    return fn


_open: dict = {}  # in the evaluation child: (path, n_ctx) -> the open model


def _window_logits(path: str, seq_len: int, rows: list[list[int]]) -> np.ndarray:
    """[b, s, vocab] float32 logits of each row, each from an empty cache."""
    model = _open.get((path, seq_len))
    if model is None:
        model = _open[(path, seq_len)] = open_model(Path(path), seq_len, logits_all=True)
    out = []
    for row in rows:
        model.reset()
        model.eval(row)
        out.append(np.array(model.scores[:len(row)], dtype=np.float32))
    return np.stack(out)


def emit(writer: BundleWriter, ctx) -> None:
    """model/model.gguf and serve/: the llama-server command and an Ollama Modelfile."""
    model, source_dir, quantized = ctx.artifacts.model, ctx.info.path, \
        ctx.artifacts.quantized
    writer.copy_file(f"{mf.MODEL_DIR}/{GGUF_FILE}", quantized.path)
    ctx = min(int(model.config.max_position_embeddings), 8192)
    writer.write_bytes(f"{SERVE_DIR}/llama-server.sh", llama_server_script(ctx).encode())
    writer.write_bytes(f"{SERVE_DIR}/Modelfile", modelfile(source_dir).encode())


def llama_server_script(ctx: int) -> str:
    repack = "" if REPACK else " --no-repack"
    why = "" if REPACK else (
        "# --no-repack: llama.cpp's CPU weight repacking off, as dwc ran and measured this\n"
        "# file (repacking crashed llama.cpp on some model shapes; see dwc's README, GGUF).\n")
    return f"""#!/bin/sh
# Serve this bundle with llama.cpp's OpenAI-compatible server (llama-server), from any
# folder: sh serve/llama-server.sh [more llama-server flags]
{why}# Speculative decoding: GGUF bundles carry no draft model (distill-draft is not in the
# GGUF targets); with a GGUF draft of the same tokenizer add
#   -md <draft.gguf> --spec-draft-n-max 8   (llama.cpp builds before the rename: --draft-max 8)
# or, with no draft model, n-gram lookup in the prompt and output (llama.cpp builds that
# have --spec-type; not run by dwc's tests):  --spec-type ngram-simple
HERE="$(cd "$(dirname "$0")/.." && pwd)"
exec llama-server -m "$HERE/{mf.MODEL_DIR}/{GGUF_FILE}" -c {ctx}{repack} --host 127.0.0.1 --port 8080 "$@"
"""


def modelfile(source_dir: Path) -> str:
    """Ollama: FROM the GGUF (its embedded chat template is read by Ollama), greedy by
    default, stopping at the end-of-sequence token."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(source_dir, local_files_only=True).eos_token
    stop = f'PARAMETER stop "{eos}"\n' if eos else ""
    # Ollama has no Modelfile parameter for llama.cpp's repacking: say so where it is used
    repack = "" if REPACK else (
        "# dwc ran this file with llama.cpp's CPU weight repacking off (llama-server\n"
        "# --no-repack); Ollama has no parameter for it. If Ollama crashes on this model,\n"
        "# serve it with serve/llama-server.sh instead.\n")
    return (f"# Ollama: ollama create <name> -f serve/Modelfile (from the bundle's folder)\n"
            f"{repack}FROM ../{mf.MODEL_DIR}/{GGUF_FILE}\nPARAMETER temperature 0\n{stop}")
