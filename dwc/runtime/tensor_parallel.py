"""Tensor parallelism: one model split across N GPUs (or N CPU processes, for tests).

The Megatron-LM split, as vLLM and TensorRT-LLM use it. Rank r of N keeps:

- q/k/v and gate/up, column-parallel: the output rows of its query heads (and the KV
  heads they read) and its 1/N of the FFN channels. Attention is independent per head
  and SwiGLU per FFN channel, so a rank computes its heads and channels with no
  communication.
- o_proj and down_proj, row-parallel: the input columns that match those heads and
  channels. Each rank's output is a partial sum of the full output; one all-reduce per
  projection (two per layer) adds them. A bias is added once, on rank 0.
- embedding and lm_head, vocabulary-parallel: 1/N of the vocabulary's rows. The embedding
  gives zeros for ids outside a rank's rows and an all-reduce assembles the hidden
  states; the lm_head's logit slices are gathered on rank 0, where the sampler runs.
- KV heads: split when num_kv_heads % N == 0. With fewer KV heads than ranks
  (N % num_kv_heads == 0) each rank keeps the one KV head its query heads share, so that
  head is replicated on N / num_kv_heads ranks. Other head counts are refused.
- norms and rotary: replicated (small).

Processes: rank 0 is the engine's process and owns the scheduler, the block manager, the
sampler and the draft model (small, unsplit). Ranks 1..N-1 are spawned workers running
`worker_main`. Each step rank 0 broadcasts the step's input (plain lists, see
ModelRunner.plan) on a CPU (gloo) group, and every rank builds the same Batch and runs
the forward on its shard. The step broadcasts have their own gloo group with a long
timeout because an idle server leaves the workers waiting there indefinitely; the
forward's collectives run on the default group (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dwc.errors import BadInput, DwcError
from dwc.runtime.model import ATTN_PROJ, MLP_PROJ

IDLE_TIMEOUT = timedelta(days=365)     # workers wait this long for the next step
STEP_TIMEOUT = timedelta(minutes=10)   # one collective inside a step (or at start-up)
READY_TIMEOUT_S = 1800                 # workers load and cut the model within this


# -- which heads and rows rank r keeps ------------------------------------------------

def check_layout(num_heads: int, num_kv_heads: int, intermediate: int, size: int) -> None:
    """Refuse, in one line, a model that cannot be split `size` ways."""
    where = f"tensor_parallel {size}"
    if size < 1:
        raise BadInput(f"{where}: must be at least 1")
    if num_heads % size:
        raise BadInput(f"{where}: num_attention_heads {num_heads} is not divisible by {size}")
    if num_kv_heads % size and size % num_kv_heads:
        raise BadInput(f"{where}: num_key_value_heads {num_kv_heads} neither divides by "
                       f"{size} nor divides it")
    if intermediate % size:
        raise BadInput(f"{where}: intermediate_size {intermediate} is not divisible by {size}")


def check_weights(config: dict, size: int, device: str = "cuda") -> None:
    """Refuse what is not cut: INT4 weights (their kernel's tinygemm packing is made on
    the GPU), and any quantized weights on the CPU (compressed-tensors' own modules run
    there, not dwc's kernels)."""
    quantized = config.get("quantization_config")
    if size > 1 and quantized and device == "cpu":
        raise BadInput(f"tensor_parallel {size}: on the CPU only unquantized models are split")
    groups = (quantized or {}).get("config_groups") or {}
    if size > 1 and any((g.get("weights") or {}).get("num_bits") == 4 for g in groups.values()):
        raise BadInput(f"tensor_parallel {size}: INT4 (W4A16) weights are not split yet; "
                       "use an FP8 or INT8 target")


def kv_heads_per_rank(num_kv_heads: int, size: int) -> int:
    """KV heads each rank's cache holds: its share, or one replicated head."""
    return max(1, num_kv_heads // size)


@dataclass(frozen=True)
class Layout:
    """What rank `rank` of `size` keeps of a model with these dimensions."""

    rank: int
    size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @property
    def heads(self) -> range:
        n = self.num_heads // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def kv_heads(self) -> range:
        """The KV heads this rank's query heads read (query head h reads KV head
        h // group): its share, or the single head its queries share."""
        group = self.num_heads // self.num_kv_heads
        return range(self.heads[0] // group, (self.heads[-1] // group) + 1)

    @property
    def vocab_rows(self) -> range:
        """This rank's vocabulary rows; every rank's slice is padded to `vocab_per_rank`
        so the gathered slices have one size."""
        lo = self.rank * self.vocab_per_rank
        return range(lo, min(lo + self.vocab_per_rank, self.vocab))

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.vocab // self.size)

    def _ffn(self) -> torch.Tensor:
        n = self.intermediate // self.size
        return torch.arange(self.rank * n, (self.rank + 1) * n)

    def _head_rows(self, heads: range) -> torch.Tensor:
        return torch.arange(heads[0] * self.head_dim, (heads[-1] + 1) * self.head_dim)

    def rows(self, name: str) -> torch.Tensor:
        """Output rows a column-parallel projection keeps (stacked ones: each part's)."""
        q, kv = self._head_rows(self.heads), self._head_rows(self.kv_heads)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": q, "k_proj": kv, "v_proj": kv,
                "qkv": torch.cat([q, q_size + kv, q_size + kv_size + kv]),
                "gate_proj": self._ffn(), "up_proj": self._ffn(),
                "gate_up": torch.cat([self._ffn(), self.intermediate + self._ffn()])}[name]

    def cols(self, name: str) -> torch.Tensor:
        """Input columns a row-parallel projection keeps."""
        return {"o_proj": self._head_rows(self.heads), "down_proj": self._ffn()}[name]


ROW_PARALLEL = ("o_proj", "down_proj")


# -- cutting modules --------------------------------------------------------------------

def cut_linear(module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
               keep_bias: bool = True, device=None):
    """A copy of `module` on `device` (default: the module's) with only output `rows`
    (column-parallel) or input `cols` (row-parallel; the bias stays only where
    `keep_bias`). Copies, so the full weight can be freed. Kernel-backed FP8 / INT8:
    per-output-channel weight scales follow the rows; a row-parallel cut keeps them
    whole (every output channel is still there, as a partial sum); the static per-tensor activation scale is unchanged: quantizing with
    one scale is elementwise, so quantizing a rank's slice of the input gives that slice
    of the whole input quantized."""
    from dwc.runtime.layers.linear import Fp8Linear, Int8Linear

    def cut(w):                                                         # w: [out, in]
        w = w[rows] if rows is not None else w[:, cols.to(w.device)]
        return w.contiguous().to(device)

    here = _device_of(module)
    device = device or here
    if rows is not None:
        rows = rows.to(here)
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias = bias.detach().to(here)
        bias = bias[rows].to(device, copy=True) if rows is not None else \
            (bias.to(device, copy=True) if keep_bias else None)
    if type(module) is torch.nn.Linear and getattr(module, "quantization_scheme", None) is None:
        w = cut(module.weight.detach())
        out = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta",
                              dtype=w.dtype)  # no allocation: the cut tensors replace them
        out.weight = torch.nn.Parameter(w, requires_grad=False)
        if bias is not None:
            out.bias = torch.nn.Parameter(bias, requires_grad=False)
        return out.requires_grad_(False)
    if type(module) is Fp8Linear:
        scale = module.scale_b.view(-1).to(device)                        # [out]
        return Fp8Linear(cut(module.weight_t.t()), scale[rows.to(device)] if rows is not None
                         else scale, module.input_scale.to(device), bias)
    if type(module) is Int8Linear:
        scale = module.scale_w.view(-1).to(device)                        # [out]
        static = None if module.input_scale is None else module.input_scale.to(device)
        return Int8Linear(cut(module.weight_t.t()), scale[rows.to(device)] if rows is not None
                          else scale, static, bias)
    raise BadInput(f"tensor parallelism cuts plain Linears and the GPU's FP8 / INT8 kernels; "
                   f"{type(module).__name__} (a quantized module on the CPU, or INT4) is not "
                   "supported")


def _device_of(module) -> torch.device:
    w = getattr(module, "weight", None)
    return (w if w is not None else module.weight_t).device


class VocabParallelEmbedding(torch.nn.Module):
    def __init__(self, embed: torch.nn.Embedding, layout: Layout, group: "Group"):
        super().__init__()
        rows = layout.vocab_rows
        self.weight = torch.nn.Parameter(embed.weight.detach()[rows.start:rows.stop].clone(),
                                         requires_grad=False)            # [vocab / N, hidden]
        self.lo, self.hi = rows.start, rows.stop
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:               # ids: [t]
        inside = (ids >= self.lo) & (ids < self.hi)
        h = F.embedding(torch.where(inside, ids - self.lo, 0), self.weight)  # [t, hidden]
        return self.group.all_reduce(h.masked_fill(~inside[:, None], 0))


class VocabParallelHead(torch.nn.Module):
    def __init__(self, head: torch.nn.Linear, layout: Layout, group: "Group"):
        super().__init__()
        if type(head) is not torch.nn.Linear or head.bias is not None:
            raise BadInput(f"tensor parallelism needs a plain lm_head without bias, not "
                           f"{type(head).__name__}")
        rows = layout.vocab_rows
        w = head.weight.detach()[rows.start:rows.stop]
        pad = layout.vocab_per_rank - w.shape[0]  # the last rank's slice may be short
        self.weight = torch.nn.Parameter(F.pad(w, (0, 0, 0, pad)).contiguous(),
                                         requires_grad=False)            # [vocab / N, hidden]
        self.vocab = layout.vocab
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:                 # x: [rows, hidden]
        local = F.linear(x, self.weight)                                # [rows, vocab / N]
        return self.group.gather_last_dim(local)[:, :self.vocab]         # rank 0: [rows, vocab]


def shard_decoder(decoder, group: "Group") -> None:
    """Cut a Decoder (after use_kernels and fuse, before its cache is made) down to rank
    `group.rank`'s shard, in place, and move what is left to its device. The checkpoint
    model's own projections are replaced by the shards (or dropped, where stacked), so
    the full weights can be freed. Tensor-parallel runners load the checkpoint and
    build the GPU's quantized kernels on the CPU and cut them there, so a GPU only ever
    holds its rank's share."""
    d = decoder
    check_layout(d.num_heads, d.num_kv_heads, d.intermediate_size, group.size)
    layout = Layout(group.rank, group.size, d.num_heads, d.num_kv_heads, d.head_dim,
                    d.intermediate_size, d.embed.weight.shape[0])
    for layer, proj in zip(d.layers, d.proj):
        for name, module in list(proj.items()):
            if name in ROW_PARALLEL:
                proj[name] = cut_linear(module, cols=layout.cols(name),
                                        keep_bias=group.rank == 0, device=d.device)
            else:
                proj[name] = cut_linear(module, rows=layout.rows(name), device=d.device)
        for part, names in ((layer.self_attn, ATTN_PROJ), (layer.mlp, MLP_PROJ)):
            for n in names:
                setattr(part, n, proj.get(n))
    d.embed = VocabParallelEmbedding(d.embed, layout, group)
    d.lm_head = VocabParallelHead(d.lm_head, layout, group)
    d.num_heads = len(layout.heads)
    d.num_kv_heads = len(layout.kv_heads)
    d.reduce = group.all_reduce
    for module in (d.layers, d.embed, d.lm_head, d.final_norm):  # norms, vocabulary shards
        module.to(d.device)
    if d.device == "cuda":
        torch.cuda.empty_cache()


# -- processes and collectives ----------------------------------------------------------

@dataclass
class WorkerSpec:
    """What a worker needs to build the same ModelRunner as rank 0 (pickled to it)."""

    model_dir: str
    dtype: str                      # torch dtype name, e.g. "bfloat16"
    runner_args: dict               # ModelRunner's keyword arguments
    size: int
    backend: str                    # "nccl" or "gloo"
    port: int                       # rank 0's rendezvous port on 127.0.0.1


@dataclass
class Group:
    """This process's place in the tensor-parallel group, and the collectives the Decoder
    and the runner call. Rank 0 also holds the worker processes."""

    rank: int
    spec: WorkerSpec
    workers: list = field(default_factory=list)
    ready: list = field(default_factory=list)  # rank 0: a pipe from each worker (start-up)

    def __post_init__(self):
        s = self.spec
        dist.init_process_group(s.backend, init_method=f"tcp://127.0.0.1:{s.port}",
                                rank=self.rank, world_size=s.size, timeout=STEP_TIMEOUT)
        self.steps = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.threads = torch.get_num_threads()  # restored by close()
        if s.runner_args["device"] == "cpu":
            # The ranks share the cores; with more threads than cores in all, threads
            # waiting at a collective spin against the ones computing (measured 7x slower).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // s.size))

    @property
    def size(self) -> int:
        return self.spec.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def gather_last_dim(self, local: torch.Tensor) -> torch.Tensor:
        """Rank 0: every rank's slice side by side; the others: their own slice."""
        if local.is_cuda and self.spec.backend == "gloo":  # gloo gathers CPU tensors only
            parts = [torch.empty_like(local) for _ in range(self.size)]
            dist.all_gather(parts, local)
        else:
            parts = [torch.empty_like(local) for _ in range(self.size)] if self.rank == 0 \
                else None
            dist.gather(local, parts, dst=0)
        return torch.cat(parts, dim=-1) if self.rank == 0 else local

    def send_step(self, step) -> None:
        """Rank 0: hand the workers the next step (None: stop)."""
        dist.broadcast_object_list([step], src=0, group=self.steps)

    def receive_step(self):
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.steps)
        return box[0]

    def wait_ready(self) -> None:
        """Rank 0, after building its own shard: wait until every worker has built its
        own; a worker's failure is raised here, in one line."""
        from multiprocessing.connection import wait

        pending = {conn: rank for rank, conn in enumerate(self.ready, start=1)}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while pending:
            got = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not got:
                self.close(force=True)
                raise DwcError(f"tensor-parallel ranks {sorted(pending.values())} did not "
                               f"start within {READY_TIMEOUT_S} s")
            for conn in got:
                rank = pending.pop(conn)
                try:
                    _, error, code = conn.recv()
                except EOFError:  # the pipe closed: the worker died without a word
                    error, code = "exited while starting", 1
                if error:
                    self.close(force=True)
                    failed = DwcError(f"tensor-parallel rank {rank}: {error}")
                    failed.exit_code = code
                    raise failed

    def close(self, force: bool = False) -> None:
        """Rank 0: stop the workers (at once with `force`) and leave the group."""
        if not dist.is_initialized():
            return
        if not force and all(w.is_alive() for w in self.workers):
            self.send_step(None)
        for w in self.workers:
            w.join(timeout=0 if force else 30)
            if w.is_alive():
                w.terminate()
                w.join()
        for conn in self.ready:
            conn.close()
        dist.destroy_process_group()
        torch.set_num_threads(self.threads)


def launch(model_dir, dtype: torch.dtype, runner_args: dict, size: int,
           backend: str | None = None) -> Group:
    """Rank 0: start ranks 1..size-1 (spawned processes) and join the group with them.
    `backend`: None for NCCL on GPUs and gloo on CPU; gloo on GPUs lets several ranks
    share one GPU (NCCL refuses that), for tests."""
    device = runner_args["device"]
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if device == "cuda" and backend == "nccl" and size > torch.cuda.device_count():
        raise BadInput(f"tensor_parallel {size} needs {size} GPUs; "
                       f"{torch.cuda.device_count()} visible")
    from dwc.checkpoint import model_info

    info = model_info(model_dir)  # refuse before starting anything
    check_layout(info.num_heads, info.num_kv_heads, info.intermediate_size, size)
    check_weights(info.config, size, device)
    if dist.is_initialized():
        raise BadInput("this process already runs a tensor-parallel engine; close it first")
    # NVLink SHARP multicast (NVLS) stays off: the lent multi-GPU machines require it.
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    spec = WorkerSpec(str(model_dir), str(dtype).removeprefix("torch."), dict(runner_args),
                      size, backend, _free_port())
    ctx = torch.multiprocessing.get_context("spawn")
    workers, ready = [], []
    for r in range(1, size):
        receive, send = ctx.Pipe(duplex=False)
        workers.append(ctx.Process(target=worker_main, args=(r, spec, send), daemon=True,
                                   name=f"dwc-tp-rank{r}"))
        workers[-1].start()
        send.close()  # the worker holds the only writer: its death closes the pipe
        ready.append(receive)
    try:
        return Group(0, spec, workers, ready)
    except BaseException:
        for w in workers:
            w.terminate()
        raise


def worker_main(rank: int, spec: WorkerSpec, ready) -> None:
    """Ranks 1..N-1: build this rank's runner, then run every step rank 0 broadcasts."""
    from pathlib import Path

    from dwc.runtime.model_runner import ModelRunner, load_hf_model

    parent = _exit_with_parent()
    device = spec.runner_args["device"]
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    group = Group(rank, spec)
    try:
        model = load_hf_model(Path(spec.model_dir), "cpu", getattr(torch, spec.dtype))
        runner = ModelRunner(model, tp=group, **spec.runner_args)
    except DwcError as e:
        ready.send((rank, e.message, e.exit_code))
        return
    except Exception as e:  # reported to rank 0, which says it in one line
        ready.send((rank, f"{type(e).__name__}: {e}", 1))
        return
    ready.send((rank, None, 0))
    ready.close()
    try:
        follow_steps(group, runner)
    except RuntimeError as e:  # DistBackendError too: rank 0 went away without saying stop
        time.sleep(0.5)
        if os.getppid() != parent:  # it was stopped (a signal ends `dwc serve` this way)
            os._exit(0)
        print(f"dwc tensor-parallel rank {rank}: stopped: {str(e).splitlines()[0]}",
              file=sys.stderr)
        os._exit(1)
    dist.destroy_process_group()


def follow_steps(group, runner) -> None:
    """A worker rank's loop: run each step rank 0 sends, until it sends None."""
    while (step := group.receive_step()) is not None:
        runner.execute(step)


def _exit_with_parent() -> int:
    """A worker whose rank 0 died (killed, so it could not say stop) exits too, instead
    of waiting for a step that never comes. Returns rank 0's pid."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="dwc-tp-watch").start()
    return parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
