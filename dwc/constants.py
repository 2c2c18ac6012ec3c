"""Project-wide constants that are not part of a file format."""

import os
from pathlib import Path

VERSION = "0.1.0"  # dwc's version (`dwc --version`, manifests); pyproject.toml repeats it

CACHE_ENV = "DWC_CACHE_DIR"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "dwc"

HASH_CHUNK = 8 << 20  # bytes read at a time when hashing files

# Sharding of the safetensors files a bundle writes (transformers' own default).
MAX_SHARD_SIZE = "5GB"

# Build files and bundle names: letters, digits and . _ - (they become folder names).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

# Kubernetes manifests (serve/kubernetes*.yaml, `dwc deploy`; docs/DEPLOY.md): the image
# each engine runs in (dwc's own is one you build: docs/DEPLOY.md), where the bundle's
# volume is mounted, the port, and the autoscaler's room.
DWC_IMAGE = f"dwc:{VERSION}"
VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"  # the vLLM release tests/test_vllm.py runs (Makefile)
TRTLLM_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:1.2.0"  # serve/ options need >= 1.2
BUNDLE_MOUNT = "/bundle"
SERVE_PORT = 8000
MAX_WAITING = 256  # `dwc serve --max-waiting`'s default: requests queued before it answers 429
HPA_MAX_FACTOR = 4  # the autoscaler's maxReplicas: this many times the replicas `tune` computed
# Without a TTFT target: the queueing delay (seconds) a replica may add before it scales.
QUEUE_WAIT_S = 1.0


def cache_dir() -> Path:
    """Where pass results and file hashes are cached ($DWC_CACHE_DIR, else ~/.cache/dwc)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()

# Runtime: chunks of at most this many tokens (decode and speculative verification steps)
# run their attention in the paged decode kernel, one kernel row per token, on the GPU.
KERNEL_MAX_CHUNK = 16

# Runtime: the largest step (in tokens) replayed from a captured CUDA graph; larger steps
# run eagerly. Decode steps of up to this many sequences are graphed.
MAX_GRAPH_TOKENS = 512
# The step sizes (tokens) captured as CUDA graphs; a step is padded up to the next one.
CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512)


def graph_sizes(max_tokens: int) -> list[int]:
    """The sizes captured for steps of up to `max_tokens` tokens."""
    return [s for s in CAPTURE_SIZES if s < max_tokens] + [max_tokens]


# Runtime: the token counts at which the other steps (those with prompt tokens, or too
# big for the decode graphs) are captured piecewise (runtime/piecewise_graphs.py). A
# step is padded up to the next size: up to 512 rows an FP8/bf16 GEMM costs about the same
# at any size (weight reads, measured), above it a step pays at most a third more rows.
PIECEWISE_SIZES = (64, 128, 256, 384, 512, 640, 768, 1024, 1280, 1536, 1792, 2048, 2304,
                   2560, 3072, 3584, 4096, 4608, 5120, 6144, 7168, 8192)


def piecewise_sizes(max_tokens: int) -> list[int]:
    """The piecewise sizes for steps of up to `max_tokens` tokens."""
    return [s for s in PIECEWISE_SIZES if s < max_tokens] + [max_tokens]


# Runtime: n-gram (prompt lookup) speculation (runtime/ngram.py): suffixes of this many
# tokens are looked up, longest first; up to NGRAM_K tokens that followed are proposed.
NGRAM_MIN_N = 2
NGRAM_MAX_N = 4
NGRAM_K = 4
# Measuring speculation candidates (dwc/compiler/speculation.py): evaluation prompts of
# 64 tokens continued by the target for 128, every 16th position of those, and bootstrap
# resamples of the positions for the intervals on tau.
SPEC_PROMPT_TOKENS = 64
SPEC_NEW_TOKENS = 128
SPEC_POSITION_STRIDE = 16
SPEC_BOOTSTRAP = 1000
# The EAGLE head's fused layers, as EAGLE-3 picks them: the outputs of layer 2, L // 2 and
# L - 3 (dwc/model/eagle_head.py tap_layers).
EAGLE_LOW_LAYER = 2
EAGLE_HIGH_FROM_TOP = 3

# Evaluation tasks (docs/QUALITY.md): the paired bootstrap of the accuracy difference,
# its resamples and seed, and the confidence of its interval (90%: the interval form of
# two one-sided tests at 5% each).
TASK_BOOTSTRAP = 2000
TASK_BOOTSTRAP_SEED = 0
TASK_CONFIDENCE = 0.90

# `dwc build --target auto | <hardware>` (docs/SEARCH.md): no new candidate starts after
# this many minutes unless the build file's search.max_minutes says otherwise.
SEARCH_MAX_MINUTES = 30.0
