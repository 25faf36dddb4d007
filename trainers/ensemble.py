"""The ensemble of M MLP members as one batched torch module (weights stacked [M, in, out]).

All members run in one `baddbmm` per layer, so they train in parallel and export is a plain copy.
The forward pass is DESIGN.md's numerics: dropout on hidden activations only (never the input), a
head with K means then K raw variances, `var = softplus(raw) + var_eps`, standardised units.
Monte-Carlo prediction with the deployed dropout masks is the kernels' job (`kernels.reference`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "silu": F.silu}
SOFTPLUS_INV_ONE = math.log(math.e - 1.0)  # softplus(x) = 1 at this x: start with unit variance


class EnsembleMLP(nn.Module):
    """M MLPs `input_dim -> hidden... -> 2K`, each initialised from its own seed."""

    def __init__(self, input_dim: int, hidden: tuple[int, ...], n_targets: int, seeds: tuple[int, ...],
                 *, dropout: float = 0.1, activation: str = "relu", var_eps: float = 1e-6):
        super().__init__()
        self.members, self.n_targets = len(seeds), n_targets
        self.dropout, self.activation, self.var_eps = dropout, activation, var_eps
        self.act = ACTIVATIONS[activation]
        widths = [input_dim, *hidden, 2 * n_targets]
        weights, biases = [], []
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            weights.append(torch.empty(self.members, fan_in, fan_out))
            biases.append(torch.zeros(self.members, fan_out))
        for m, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed))
            for i, w in enumerate(weights):
                head = i == len(weights) - 1
                # He-uniform for hidden layers (He et al. 2015); a small head so training starts near
                # mean 0, variance 1 in standardised units.
                bound = (0.1 if head else math.sqrt(6.0)) / math.sqrt(w.shape[1])
                w[m].uniform_(-bound, bound, generator=g)
        biases[-1][:, n_targets:] = SOFTPLUS_INV_ONE
        self.weights = nn.ParameterList(nn.Parameter(w) for w in weights)
        self.biases = nn.ParameterList(nn.Parameter(b) for b in biases)

    def first_layer(self, x: torch.Tensor) -> torch.Tensor:
        """`h1 = act(x W1 + b1)` for x [B, D] (shared by all members' inputs) or [M, B, D]."""
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.members, -1, -1)
        return self.act(torch.baddbmm(self.biases[0].unsqueeze(1), x, self.weights[0]))

    def rest(self, h: torch.Tensor, masks: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """Layers 2..L and the head on h1 [M, B, H]. Dropout is torch's (training mode) unless `masks`
        (one {0,1} tensor per hidden layer, broadcastable to its activations) are given."""
        n = len(self.weights)
        for i in range(1, n):
            if masks is not None:
                h = h * masks[i - 1] / (1.0 - self.dropout)
            elif self.dropout > 0:
                h = F.dropout(h, self.dropout, self.training)
            h = torch.baddbmm(self.biases[i].unsqueeze(1), h, self.weights[i])
            if i < n - 1:
                h = self.act(h)
        mu, raw = h.split(self.n_targets, dim=-1)
        return mu, F.softplus(raw) + self.var_eps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, D] or [M, B, D] (standardised input) -> (mu, var), each [M, B, K]."""
        return self.rest(self.first_layer(x))


def gaussian_nll(mu: torch.Tensor, var: torch.Tensor, y: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """Heteroscedastic Gaussian NLL per element (without the constant 0.5 log 2 pi). With beta > 0 the
    beta-NLL of Seitzer et al. (2022, ICLR): each term weighted by the stop-gradient var**beta, so
    the variance head cannot starve the mean of gradient on hard examples."""
    nll = 0.5 * (torch.log(var) + (y - mu) ** 2 / var)
    return nll * var.detach() ** beta if beta > 0 else nll
