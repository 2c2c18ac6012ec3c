"""Which heads, rows and vocabulary rank r of N keeps (arithmetic only: the compiler's
checks and the KV plan use it without torch.distributed). See parallel/__init__.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dwc.errors import BadInput


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
