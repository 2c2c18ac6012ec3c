"""Log-probabilities of the logits as served (after the quantized kernels), in float32.

Generated tokens: the row each token was sampled (or accepted) from, a row the step
computes anyway. Prompt tokens (a request's `prompt_logprobs`): position p's logits score
prompt token p + 1, so a prefill chunk of such a sequence also returns the rows of its
prompt positions. The runner appends those rows after every chunk's own rows (so the
engine's use of the first rows is unchanged), and the engine records them here.

Values are the log-softmax of the raw logits (before temperature, top-k or top-p), as
vLLM reports them by default: what a client scoring text (lm-eval) needs.
"""

from __future__ import annotations

import torch

from dwc.runtime.scheduler import Chunk


def prompt_positions(chunk: Chunk) -> range:
    """The positions of `chunk` whose logits score a prompt token not yet recorded (empty
    unless its sequence asks for prompt logprobs). The last prompt position scores the
    first generated token, which the chunk's own row already covers. Such a sequence
    skips the prefix cache (cached blocks hold K/V, not logits), so its chunks start
    where its record ends; a recompute after preemption records nothing twice."""
    seq = chunk.seq
    if seq.params.prompt_logprobs is None:
        return range(0)
    first = max(chunk.start, len(seq.prompt_logprobs))
    return range(first, min(chunk.start + chunk.length, len(seq.prompt_ids) - 1))


def prompt_rows(chunks: list[Chunk]) -> list[int]:
    """Token rows (in the step's flattened batch) of every chunk's `prompt_positions`."""
    if all(c.seq.params.prompt_logprobs is None for c in chunks):
        return []  # every step asks; almost none has such a request (batch 256: 0.6 ms)
    rows, offset = [], 0
    for c in chunks:
        rows.extend(offset + p - c.start for p in prompt_positions(c))
        offset += c.length
    return rows


def wanted(chunks: list[Chunk]) -> bool:
    return any(c.seq.params.logprobs is not None or c.seq.params.prompt_logprobs is not None
               for c in chunks)


def record(chunks: list[Chunk], logits: torch.Tensor, new_tokens: list[list[int]]) -> None:
    """Append to each asking sequence the entries of this step: `logits` is the runner's
    output (each chunk's own rows in chunk order, then the prompt rows), `new_tokens`
    the tokens each chunk yields (token j comes from the chunk's row j). Call before the
    engine appends the tokens (prompt_positions reads the record's length)."""
    own = sum(c.logits for c in chunks)
    row, extra = 0, own
    for c, tokens in zip(chunks, new_tokens):
        seq = c.seq
        positions = prompt_positions(c)
        if positions:
            targets = [seq.prompt_ids[p + 1] for p in positions]
            seq.prompt_logprobs.extend(entries(logits[extra:extra + len(targets)], targets,
                                               seq.params.prompt_logprobs))
            extra += len(targets)
        if seq.params.logprobs is not None and tokens:
            seq.logprobs.extend(entries(logits[row:row + len(tokens)], tokens,
                                        seq.params.logprobs))
        row += c.logits


def entries(rows: torch.Tensor, targets: list[int], k: int) -> list[tuple]:
    """rows [n, vocab] -> per row (logprob of its target, [(token id, logprob)] of the k
    most likely tokens)."""
    lp = torch.log_softmax(rows.float(), dim=-1)                           # [n, vocab]
    index = torch.tensor(targets, dtype=torch.long, device=lp.device)[:, None]
    chosen = lp.gather(1, index)[:, 0].tolist()
    if not k:
        return [(c, []) for c in chosen]
    values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)                     # [n, k]
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]
