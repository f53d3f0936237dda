"""Muon: the optimizer the moving-digits preset trains both stages with (train.py --optimizer muon).

The paper trains with Adam, and so does every real-data preset here. Muon
(Jordan et al., 2024) keeps a momentum of each weight matrix's gradient and
steps along its nearest orthogonal matrix (a few Newton-Schulz iterations), so
every direction of the matrix moves at the same rate instead of the few that
dominate the gradient. On the moving digits a prior trained with it for 2500
steps reaches a lower test loss than with Adam for 5000, and the VQ-VAE's
reconstruction error falls by a third in the same steps
(docs/presets.md, "Why the digits run trains with Muon").

    from muon import make_optimizer
    optimizer = make_optimizer(model, "muon", lr=3e-3)   # or "adam": the paper's
"""

import torch
import torch.nn as nn

from gpt import VideoGPT
from vqvae import VQVAE

# Muon is only for linear maps between hidden widths (`hidden_matrices`:
# the prior's attention and MLP matrices, the VQ-VAE's convolutions, a kernel seen as
# one (shape[0], everything else) matrix); every other weight keeps Adam.

# The quintic Newton-Schulz iteration X <- a X + (b A + c A^2) X, A = X X^T, with Jordan's
# coefficients: starting from a matrix of norm <= 1, five steps bring every singular value
# that is not tiny to somewhere between about 0.7 and 1.2, leaving the singular vectors
# alone. Not exactly 1, but it trains as well as the exact U V^T and costs a few matmuls
# instead of an SVD.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5):
    """(n, rows, cols) stacked matrices -> about U V^T for each G = U S V^T, in bfloat16."""
    X = G.bfloat16()
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        # Work on the wide side, whose Gram matrix is the smaller one.
        X = X.mT                                                     # (n, cols, rows)
    # Divided by its Frobenius norm, the spectral norm is at most 1, where the iteration converges.
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    a, b, c = NEWTON_SCHULZ
    for _ in range(steps):
        A = X @ X.mT                                                 # (n, r, r), r the smaller side
        X = a * X + (b * A + c * A @ A) @ X                          # (n, r, the larger side)
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised.

    Each weight (a matrix, or a convolution's kernel seen as the matrix (shape[0], the rest))
    steps by lr * 0.2 * sqrt(max(rows, cols)) along orthogonalize(momentum). The entries of such a
    step have the root-mean-square size of an Adam update of the same lr (PyTorch's
    "match_rms_adamw" rule), so one learning rate and one schedule serve both. Weights of one
    matrix shape are orthogonalised together, as one batch of matrices.
    """

    def __init__(self, params, lr, momentum=0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                # Nesterov's look-ahead, as a matrix.
                update = p.grad.lerp(buf, group["momentum"]).flatten(1)     # (rows, cols)
                by_shape.setdefault(tuple(update.shape), []).append((p, update))
            for (rows, cols), todo in by_shape.items():
                directions = orthogonalize(torch.stack([u for _, u in todo]))   # (n, rows, cols)
                for (p, _), d in zip(todo, directions):
                    d = d.reshape(p.shape)                 # (rows, cols) -> the weight's shape
                    p.add_(d, alpha=-group["lr"] * 0.2 * max(rows, cols) ** 0.5)


class MuonAdam:
    """Muon for `matrices`, Adam for `others`, stepped together: to the loop (and the GradScaler),
    one optimizer, driven by one learning rate and schedule."""

    def __init__(self, matrices, others, lr, betas):
        self.muon = Muon(matrices, lr=lr)
        self.adam = torch.optim.Adam(others, lr=lr, betas=betas)

    @property
    def param_groups(self):
        """Both optimizers' groups (what set_lr and the GradScaler walk); looked up each time, since
        load_state_dict replaces an optimizer's group dicts with new ones."""
        return self.muon.param_groups + self.adam.param_groups

    def step(self):
        self.muon.step()
        self.adam.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adam.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return dict(muon=self.muon.state_dict(), adam=self.adam.state_dict())

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adam.load_state_dict(state["adam"])


def hidden_matrices(model):
    """The weights Muon trains: linear maps between hidden widths.

    The prior (VideoGPT): the blocks' attention q/k/v/out, cross-attention and MLP matrices.
    Embeddings, position tables, norms (a class's gains included), biases and the output layer
    stay with Adam: they are lookups and scales, not linear maps between hidden widths.
    The VQ-VAE: every convolution and attention projection, a kernel (out, in, k, k, k) seen as one
    (out, in*k^3) matrix (a transposed convolution's (in, out, k, k, k) as (in, out*k^3)). The
    encoder's first convolution (from RGB) and the decoder's last (to RGB) stay with Adam, as do
    biases and norms; the codebook has no gradient (its entries are moving averages).
    """
    if isinstance(model, VQVAE):
        rgb = {id(model.encoder.convs[0].conv.weight), id(model.decoder.convts[-1].convt.weight)}
        return [p for p in model.parameters() if p.dim() >= 2 and id(p) not in rgb]
    assert isinstance(model, VideoGPT), (
        f"Muon knows the VQVAE's and the VideoGPT's matrices, not a {type(model).__name__}'s")
    matrices = []
    for block in model.blocks:
        for part in (block.attn, block.cross_attn, block.mlp):
            if part is not None:
                matrices += [m.weight for m in part.modules() if isinstance(m, nn.Linear)]
    return matrices


def optimizer_kind(state):
    """Which optimizer a checkpoint's state is from: "muon" (MuonAdam's two halves) or "adam"."""
    return "muon" if isinstance(state, dict) and "muon" in state else "adam"


def make_optimizer(model, kind, lr, betas=(0.9, 0.999)):
    """Adam over every weight, or ("muon") MuonAdam over hidden_matrices(model) and the rest."""
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, betas=betas)
    matrices = hidden_matrices(model)
    chosen = {id(p) for p in matrices}
    return MuonAdam(matrices, [p for p in model.parameters() if id(p) not in chosen], lr, betas)
