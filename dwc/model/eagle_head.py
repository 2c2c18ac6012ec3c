"""The EAGLE-style draft head (docs/SPECULATION.md, "eagle"): one decoder layer over the
target's own hidden states.

At position p the head reads the token x_p and a feature of the position before it:
    g_{p-1} = fc(concat(h_low, h_mid, h_high)_{p-1})      [hidden]   (EAGLE-3's fusion)
    x       = fuse(concat(embed(x_p), g_{p-1}))            [hidden]   (EAGLE's input)
    o_p     = layer(x)                                     [hidden]   (a decoder layer)
and predicts x_{p+1} with the target's own final norm and LM head: lm_head(norm(o_p)).
h_* are the outputs of three of the target's decoder layers (`tap_layers`); position 0
has no position before it and reads a zero feature. Drafting K tokens is a chain: each
later step feeds the head its own previous output o in place of g (EAGLE's scheme).

The embedding, final norm, rotary tables and LM head are the target's modules, attached
(`attach`), not copied: `parameters()` and `state_dict()` hold the head's own weights only
(fc, fuse, the layer), which is what training updates and the bundle stores.
The layer is the target's own decoder-layer class, so the runtime serves it with the
same code as the target's layers (dwc/runtime/eagle.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from dwc.constants import EAGLE_HIGH_FROM_TOP, EAGLE_LOW_LAYER
from dwc.formats import manifest as mf


def tap_layers(num_layers: int) -> tuple[int, int, int]:
    """The low, mid and high layers whose outputs the head reads, as EAGLE-3 picks them
    (2, L // 2, L - 3), kept in order inside small models (a 4-layer model: 1, 2, 3)."""
    low = min(EAGLE_LOW_LAYER, num_layers // 4)
    mid = num_layers // 2
    high = min(num_layers - 1, max(num_layers - EAGLE_HIGH_FROM_TOP, mid + 1))
    return low, mid, high


class EagleHead(torch.nn.Module):
    def __init__(self, config, layer_cls, taps: tuple[int, ...]):
        """`config`: the target's transformers config (the layer's shape); `layer_cls`: its
        decoder-layer class; `taps`: the target layers whose outputs are fused."""
        super().__init__()
        h = config.hidden_size
        self.config = copy.deepcopy(config)
        self.config.num_hidden_layers = 1
        self.taps = tuple(int(t) for t in taps)
        self.fc = torch.nn.Linear(len(self.taps) * h, h, bias=False)
        self.fuse = torch.nn.Linear(2 * h, h, bias=False)
        self.layer = layer_cls(self.config, layer_idx=0)
        self.shared = None  # the target's modules (attach): not parameters of the head

    @classmethod
    def for_target(cls, target, source=None) -> "EagleHead":
        """A fresh head for `target` (a transformers causal LM): the layer initialised
        from the top layer of `source` (the unquantized model the target was made from;
        default the target itself: a quantized target's layers hold FP8 weights and
        scales, not the plain layer's tensors); fc passes the high layer's output on, so
        the feature starts in the space of the head's own output (regressed to the
        target's last layer), which later steps of a chain feed back in its place; fuse
        averages the embedding and the feature."""
        layers = target.model.layers
        head = cls(target.config, type(layers[0]), tap_layers(len(layers)))
        head.layer.load_state_dict((source or target).model.layers[-1].state_dict())
        h, n = target.config.hidden_size, len(head.taps)
        with torch.no_grad():
            eye = torch.eye(h)
            head.fc.weight.copy_(torch.cat([torch.zeros(h, (n - 1) * h), eye], 1))
            head.fuse.weight.copy_(torch.cat([eye, eye], 1) / 2)
        # On the target's device: a build on a GPU machine trains there (the shared
        # embedding, norm and LM head stay the target's).
        return head.float().to(target.device).attach(target)

    def attach(self, target) -> "EagleHead":
        inner = target.model
        self.shared = SimpleNamespace(embed=inner.embed_tokens, norm=inner.norm,
                                      rotary=inner.rotary_emb, lm_head=target.lm_head)
        return self

    # -- training and measurement (transformers' layer) ------------------------------

    def features(self, tapped: torch.Tensor) -> torch.Tensor:
        """[b, T, taps * hidden] layer outputs -> [b, T, hidden] g, shifted one position
        on: row p holds g_{p-1}, row 0 zeros."""
        g = self.fc(tapped)
        return torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], 1)

    def forward(self, ids: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """ids [b, T], feats [b, T, hidden] (the feature before each token), positions
        [b, T] -> o [b, T, hidden]. `mask` [b, 1, T, T + cached] bool (None: causal)."""
        s = self.shared
        embed = s.embed(ids).to(feats.dtype)
        x = self.fuse(torch.cat([embed, feats], -1))
        cos, sin = s.rotary(x, positions)
        out = self.layer(x, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=cache is not None,
                         position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out

    def logits(self, o: torch.Tensor) -> torch.Tensor:
        s = self.shared
        w = s.lm_head.weight
        return s.lm_head(s.norm(o.to(w.dtype))).float()

    @torch.inference_mode()
    def draft(self, ids: torch.Tensor, tapped: torch.Tensor, k: int) -> list[int]:
        """k greedy tokens after ids [n] given the target's tapped layer outputs at those
        positions [n, taps * hidden]: the head over the prefix, then the chain."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        n = len(ids)
        feats = self.features(tapped[None].float())
        dev = ids.device
        o = self.forward(ids[None], feats, torch.arange(n, device=dev)[None], cache=cache)[:, -1:]
        out = []
        for j in range(k):
            token = int(self.logits(o[0, -1]).argmax())
            out.append(token)
            if j + 1 < k:
                pos = torch.tensor([[n + j]], device=dev)
                o = self.forward(torch.tensor([[token]], device=dev), o, pos, cache=cache)
        return out

    # -- files ---------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """eagle.safetensors (the head's own weights) and eagle.json (its taps and the
        target's config it was made for)."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(torch.bfloat16).contiguous()
                 for k, v in self.state_dict().items()}
        save_file(state, folder / mf.EAGLE_WEIGHTS)
        (folder / mf.EAGLE_CONFIG).write_text(json.dumps(
            {"taps": list(self.taps), "hidden_size": self.config.hidden_size,
             "layer_class": type(self.layer).__name__,
             "params": sum(p.numel() for p in self.parameters())}, indent=2) + "\n")


def is_eagle(folder: Path | None) -> bool:
    return folder is not None and (Path(folder) / mf.EAGLE_CONFIG).is_file()


def eagle_taps(folder: Path) -> tuple[int, ...]:
    """The target layers the head saved in `folder` reads."""
    return tuple(int(t) for t in json.loads((Path(folder) / mf.EAGLE_CONFIG).read_text())["taps"])


def load_head(folder: Path, target) -> EagleHead:
    """The head saved in `folder`, attached to `target` (the model it was trained on)."""
    from safetensors.torch import load_file

    from dwc.errors import BadInput

    info = json.loads((Path(folder) / mf.EAGLE_CONFIG).read_text())
    layers = target.model.layers
    if info["hidden_size"] != target.config.hidden_size or max(info["taps"]) >= len(layers):
        raise BadInput(f"{folder}/{mf.EAGLE_CONFIG}: made for another model (hidden size "
                       f"{info['hidden_size']}, taps {info['taps']})")
    head = EagleHead(target.config, type(layers[0]), info["taps"])
    head.load_state_dict(load_file(Path(folder) / mf.EAGLE_WEIGHTS))
    return head.attach(target)


def tapped_forward(target, ids: torch.Tensor, taps: tuple[int, ...]):
    """The target over ids [b, T]: (its tapped layer outputs [b, T, taps * hidden], its
    last layer's output [b, T, hidden] (before the final norm), logits [b, T, V])."""
    layers = target.model.layers
    kept: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(_module, _args, out):
            kept[i] = out[0] if isinstance(out, tuple) else out
        return hook

    wanted = set(taps) | {len(layers) - 1}
    hooks = [layers[i].register_forward_hook(keep(i)) for i in sorted(wanted)]
    try:
        logits = target(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([kept[i] for i in taps], -1), kept[len(layers) - 1], logits
