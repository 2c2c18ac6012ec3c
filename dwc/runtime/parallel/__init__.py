"""Tensor parallelism: one model split across N GPUs (or N CPU processes, for tests).

layout.py: which heads and rows rank r keeps (arithmetic only); shard.py: cutting a
Decoder to its rank's shard (imports only the model); workers.py: the processes and
collectives (imports the model runner, which imports shard.py: no circle).

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
