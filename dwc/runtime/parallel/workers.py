"""The processes and collectives of tensor parallelism: rank 0 in the engine's process,
ranks 1..N-1 spawned workers following its steps (parallel/__init__.py)."""

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

from dwc.errors import BadInput, DwcError
from dwc.runtime.parallel.layout import check_layout, check_weights

IDLE_TIMEOUT = timedelta(days=365)     # workers wait this long for the next step
STEP_TIMEOUT = timedelta(minutes=10)   # one collective inside a step (or at start-up)
READY_TIMEOUT_S = 1800                 # workers load and cut the model within this


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
    from dwc.model.checkpoint import model_info

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
