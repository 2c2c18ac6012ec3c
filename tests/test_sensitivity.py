"""Per-layer error against a float64 computation of the same quantity."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dwc.quality.sensitivity import layer_errors


class RoundedLinear(torch.nn.Linear):
    """Stands in for a compressed-tensors module: float weight, rounded inside forward."""

    quantization_scheme = "test"

    def forward(self, x):
        return F.linear(x, torch.round(self.weight * 4) / 4, self.bias)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.a = RoundedLinear(8, 6)
        self.b = torch.nn.Linear(6, 5)  # not quantized: not reported
        self.device = torch.device("cpu")

    def forward(self, ids):
        return self.b(self.a(self.embed(ids)))


def test_layer_error_matches_float64():
    torch.manual_seed(0)
    model = Tiny()
    windows = [torch.randint(0, 20, (7,)) for _ in range(5)]
    got = layer_errors(model, windows, batch_size=2)
    x = model.embed(torch.stack(windows)).double()               # [5, 7, 8]
    w, b = model.a.weight.double(), model.a.bias.double()
    y = x @ w.T + b
    yq = x @ (torch.round(w * 4) / 4).T + b
    expected = ((yq - y) ** 2).sum() / (y ** 2).sum()
    assert set(got) == {"a"}
    assert abs(got["a"] - expected.item()) < 1e-5 * expected.item()
