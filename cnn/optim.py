"""Adam (plus Muon for the conv weights) and the learning-rate schedule, a pure function of the step.

With optim.muon_lr > 0 the weights of the convolutions that have more than one input
channel (conv2, conv3) are trained by Muon -- momentum orthogonalized by a Newton-Schulz
iteration (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/; the same
iteration as torch.optim.Muon, which takes only 2-D parameters) on the weight flattened
to out_channels x (in_channels * kh * kw).  Every other parameter (conv1, the biases, the
two linear layers) stays with Adam.  Measured over the first 29,952 images (234 steps of
128; docs/performance.md, "Sample efficiency"): 98.63-98.80% test accuracy with Adam alone, 98.93-99.04%
with Muon on the convs, 99.16-99.32% with label smoothing 0.1 on top (the default recipe).
Muon on the 2048x625 layer helped as much but cost ~4x the step on a CPU (its Newton-Schulz
products outweigh a batch of 128 images); on the convs, with the Gram form of the iteration,
~8% of an fp32 step and ~12% of a bf16 one on a 2-core CPU (bench/muon_share.py).  muon_lr=0 is
Adam for everything, exactly as before Muon was added.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cnn.config import OptimConfig

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz, as torch.optim.Muon and the paper
NS_STEPS = 5
MUON_MOMENTUM = 0.95


def newton_schulz(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """An approximately orthogonal matrix with g's row and column spaces (U V^T of g's SVD, roughly).

    The quintic iteration x <- (a I + b A + c A^2) x, A = x x^T, in its Gram form ("Gram
    Newton-Schulz", https://tridao.me/blog/2026/gram-newton-schulz/) where that costs fewer flops: every
    iterate is q x0 with q a polynomial in the small m x m Gram matrix of the normalized x0 (m the
    short side), so the iteration runs on m x m products -- q <- P q and A <- P A P with
    P = a I + b A + c A^2 -- and touches the long side twice, to form x0 x0^T and q x0, where the
    direct form (newton_schulz_direct) does twice per iteration. The same polynomial; in fp32 it
    differs from the direct form by rounding (~2e-6 relative, tests/test_optim.py). Reduced
    precision takes the direct form -- half-precision grads, or fp32 matmuls that run as TF32 or bf16
    (exact_fp32_matmul): the Gram matrix squares the condition number, and there the Gram form needs
    restarts to stay stable (the same post).
    """
    rows, cols = g.shape
    if (g.dtype not in (torch.float32, torch.float64) or not exact_fp32_matmul(g.device.type)
            or not gram_pays(min(rows, cols), max(rows, cols), steps)):
        return newton_schulz_direct(g, steps)
    a, b, c = NS_COEFFICIENTS
    x = g / (g.norm() + 1e-7)
    wide = rows <= cols
    if not wide:
        x = x.T
    gram = x @ x.T
    for k in range(steps):
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # P - a I
        if k == 0:
            poly.diagonal().add_(a)  # P itself: the diagonal is a view
            q = poly
            if steps > 1:
                gram = q @ gram @ q
            continue
        q = torch.addmm(q, poly, q, beta=a)  # P q
        if k < steps - 1:
            p_gram = torch.addmm(gram, poly, gram, beta=a)  # P A
            gram = torch.addmm(p_gram, p_gram, poly, beta=a)  # P A P
    x = q @ x
    return x if wide else x.T


def gram_pays(short: int, long: int, steps: int) -> bool:
    """Whether the Gram form of `steps` iterations on a short x long matrix costs fewer multiply-adds
    than the direct form: 2 s^2 l + (4 steps - 3) s^3 against steps (2 s^2 l + s^3). Muon's two
    matrices (64 x 288, 128 x 576) at 5 iterations: 0.52x the direct form's."""
    gram = 2 * short * short * long + (4 * steps - 3) * short ** 3
    return gram < steps * (2 * short * short * long + short ** 3)


def exact_fp32_matmul(device_type: str) -> bool:
    """Whether fp32 matmuls on this device type run in fp32 (torch's default) rather than TF32 or bf16
    -- torch.set_float32_matmul_precision("high"/"medium"), torch.backends.cuda.matmul.allow_tf32, or
    the fp32_precision settings behind both (torch 2.9+), read as ATen resolves them (Context.cpp
    `float32Precision`: the op's setting, else its backend's, else the generic one; "none" is fp32)."""
    backends = torch.backends
    if device_type == "cuda":
        matmul = backends.cuda.matmul
        if not hasattr(matmul, "fp32_precision"):  # before torch 2.9
            return not matmul.allow_tf32
        levels = [matmul.fp32_precision, backends.fp32_precision]
        reduced = {"tf32"}  # CUDA has no bf16 setting: ATen reads it as none
    else:
        if not hasattr(backends.mkldnn.matmul, "fp32_precision"):
            return True
        levels = [backends.mkldnn.matmul.fp32_precision, backends.mkldnn.fp32_precision, backends.fp32_precision]
        reduced = {"tf32", "bf16"}
    return next((level for level in levels if level != "none"), "ieee") not in reduced


def newton_schulz_direct(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """The direct form, in torch.optim.Muon's (torch/optim/_muon.py `_zeropower_via_newtonschulz`):
    the sums folded into two addmm, 4 ops an iteration where the written-out form dispatched 8."""
    a, b, c = NS_COEFFICIENTS
    x = g / (g.norm() + 1e-7)
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Nesterov momentum whose update is orthogonalized per weight matrix (conv weights flattened).

    Scaler-aware as fused Adam is: an enabled GradScaler.step sets ``grad_scale`` (the loss scale,
    or None when ``scaler.unscale_`` already ran) and ``found_inf`` (0 or 1, on the device) on the
    optimizer and calls step(); the grads are unscaled and an inf/nan step leaves the weights and
    the momentum unchanged without reading either tensor on the host (no sync per step).
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float, momentum: float = MUON_MOMENTUM, ns_steps: int = NS_STEPS,
                 cuda_graph: bool = False) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "ns_steps": ns_steps})
        self.cuda_graph = cuda_graph  # train.muon_cuda_graph and a CUDA device (uses_cuda_graph)
        self._graph: GraphedUpdate | None = None

    @property
    def graph_replays(self) -> int:
        return 0 if self._graph is None else self._graph.replays

    @torch.no_grad()
    def step(self, closure=None):
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if self.cuda_graph and grad_scale is None and found_inf is None and self._replay():
            return
        # the reciprocal in fp64, then a multiply, as GradScaler.unscale_ does: the unscaled grads
        # (written back to .grad, as fused Adam does) are the generic path's bit for bit
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if inv_scale is not None:
                torch._foreach_mul_(grads, inv_scale.to(params[0].device, non_blocking=True))
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            momentum = group["momentum"]
            # one op per line for all weights (foreach), where a loop dispatched one per weight
            if found_inf is None:
                torch._foreach_mul_(bufs, momentum)
                new_bufs = bufs
            else:  # the buffers keep their values where the step is skipped
                new_bufs = torch._foreach_mul(bufs, momentum)
            torch._foreach_add_(new_bufs, grads)
            updates = torch._foreach_add(grads, new_bufs, alpha=momentum)  # Nesterov
            for p, buf, new_buf, update in zip(params, bufs, new_bufs, updates):
                ortho = newton_schulz(update.reshape(update.shape[0], -1), group.get("ns_steps", NS_STEPS))
                alpha = -group["lr"] * _scale(p)  # _scale: 1 for conv2 (64x288) and conv3 (128x576)
                if found_inf is None:
                    p.add_(ortho.view(p.shape), alpha=alpha)
                    continue
                # where, not a multiply by (1 - found_inf): an inf grad makes the update nan, and nan * 0 is nan
                skip = found_inf.to(p.device, non_blocking=True) != 0
                buf.copy_(torch.where(skip, buf, new_buf))
                p.copy_(torch.where(skip, p, p.add(ortho.view(p.shape), alpha=alpha)))

    def _replay(self) -> bool:
        """Replays the captured update (capturing it first, or again when a weight, buffer or
        hyperparameter it baked in changed); False where it cannot run: a weight without a grad,
        or before the first (eager) step has made the momentum buffers."""
        entries = [(p, self.state[p].get("momentum_buffer"), g) for g in self.param_groups for p in g["params"]]
        if not entries or any(p.grad is None or buf is None or not p.is_cuda for p, buf, _ in entries):
            return False
        key = tuple((p.data_ptr(), buf.data_ptr(), g["momentum"], g.get("ns_steps", NS_STEPS)) for p, buf, g in entries)
        if self._graph is None or self._graph.key != key:
            self._graph = GraphedUpdate(key, [(p, buf, g["momentum"], g.get("ns_steps", NS_STEPS))
                                              for p, buf, g in entries])
        self._graph.run([p.grad for p, _, _ in entries], [g["lr"] for _, _, g in entries])
        return True


def _scale(p: torch.Tensor) -> float:
    """Muon's update scale, as the paper: sqrt(max(1, rows / cols)) of the flattened weight."""
    rows = p.shape[0]
    return max(1.0, rows / (p.numel() // rows)) ** 0.5  # from the shape alone: no op dispatched


def _update(params, bufs, grads, alphas, momenta, ns_steps) -> None:
    """Muon's step on given tensors, the learning rate (times -scale) as a 0-dim tensor each: the
    body of the CUDA graph (GraphedUpdate)."""
    for p, buf, grad, alpha, m, n in zip(params, bufs, grads, alphas, momenta, ns_steps):
        buf.mul_(m).add_(grad)
        ortho = newton_schulz(grad.add(buf, alpha=m).reshape(p.shape[0], -1), n)
        p.add_(ortho.view(p.shape) * alpha)


class GraphedUpdate:
    """Muon's update for fixed weights and momentum buffers as one CUDA graph: its ~50 kernel
    launches (momentum, Newton-Schulz, the weight update) replay as one, which on a GPU is host time
    saved (measured on an H200: Muon's eager step ~1.9 ms of host time, Adam's fused one ~0.2 ms).

    The grads are copied into static inputs each step (DDP's bucket views or not, any address), the
    learning rates filled into 0-dim device tensors (a kernel argument, no host-device sync). The
    warm-up before the capture runs on copies on a side stream, so it leaves the weights and buffers
    untouched; the capture itself runs nothing. Numerically it is the eager step but for the weight
    update's rounding (a product with a tensor learning rate instead of add's alpha)."""

    def __init__(self, key: tuple, entries: list[tuple[torch.Tensor, torch.Tensor, float, int]]) -> None:
        self.key, self.replays = key, 0
        params, bufs = [p for p, _, _, _ in entries], [b for _, b, _, _ in entries]
        self.momenta, self.ns_steps = [m for _, _, m, _ in entries], [n for _, _, _, n in entries]
        self.scales = [_scale(p) for p in params]
        device = params[0].device
        self.grads = [torch.zeros_like(p) for p in params]
        self.alphas = [torch.zeros((), device=device, dtype=p.dtype) for p in params]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # cuBLAS handles and workspaces, on copies
            _update([p.clone() for p in params], [b.clone() for b in bufs], self.grads, self.alphas,
                    self.momenta, self.ns_steps)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.graph.uncounted = True  # not one of torch.compile's (cnn/perf/cudagraphs.py counts those)
        # thread_local: the NCCL watchdog's event queries on its own thread may go on during the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            _update(params, bufs, self.grads, self.alphas, self.momenta, self.ns_steps)

    def run(self, grads: list[torch.Tensor], lrs: list[float]) -> None:
        torch._foreach_copy_(self.grads, grads)
        for alpha, lr, scale in zip(self.alphas, lrs, self.scales):
            alpha.fill_(-lr * scale)
        self.graph.replay()
        self.replays += 1


def facts(opt: torch.optim.Optimizer | AdamMuon) -> dict[str, int]:
    """For summary.json: how many Muon updates replayed as a CUDA graph (where it is on)."""
    if isinstance(opt, AdamMuon) and opt.muon.cuda_graph:
        return {"muon_graph_replays": opt.muon.graph_replays}
    return {}


def uses_cuda_graph(device_type: str, enabled: bool) -> bool:
    """train.muon_cuda_graph: Muon's update replays as a CUDA graph on CUDA only (CPUs have no graphs;
    there a step's host time is not the bottleneck)."""
    return enabled and device_type == "cuda"


class AdamMuon:
    """Adam and Muon as one optimizer to the loop, the grad scaler (which needs param_groups and
    step) and the checkpoint (state_dict holds both).

    With a fused Adam it handles loss scaling itself, as fused Adam does: an enabled GradScaler
    then checks the grads for inf/nan on the device, sets ``grad_scale`` and ``found_inf`` here
    and calls step(), which hands both to Adam's fused kernel and to Muon -- where the generic
    path would read found_inf with ``.item()``, a host-device sync every step.
    """

    def __init__(self, adam: torch.optim.Optimizer, muon: Muon) -> None:
        self.adam, self.muon = adam, muon

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # only fused Adam takes grad_scale/found_inf; the foreach fallback asserts they are None
        return bool(getattr(self.adam, "_step_supports_amp_scaling", False))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adam.param_groups + self.muon.param_groups

    @property
    def state(self) -> dict:
        return {**self.adam.state, **self.muon.state}

    def step(self, closure=None) -> None:
        # set by an enabled GradScaler.step for the duration of this call; absent otherwise
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        scaled = grad_scale is not None or found_inf is not None
        parts = (self.adam, self.muon)
        if scaled:
            for part in parts:
                part.grad_scale, part.found_inf = grad_scale, found_inf
        try:
            for part in parts:
                part.step()
        finally:
            if scaled:
                for part in parts:
                    del part.grad_scale, part.found_inf

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adam.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"adam": self.adam.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"adam", "muon"}:
            raise ValueError("this optimizer state is Adam's alone, not Adam + Muon (optim.muon_lr)")
        self.adam.load_state_dict(state["adam"])
        self.muon.load_state_dict(state["muon"])


def _adam(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    # The fused kernel (one launch for all parameters) exists on CUDA and, since
    # torch 2.4, on CPU; fall back to foreach where a build lacks it.
    try:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def muon_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights Muon trains: convolutions with more than one input channel."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig,
                    cuda_graph: bool = False) -> torch.optim.Optimizer | AdamMuon:
    """Adam over every parameter (optim.muon_lr=0), else Adam + Muon (see the module doc);
    cuda_graph (train.muon_cuda_graph): Muon's update as a CUDA graph where the model is on CUDA."""
    if cfg.muon_lr <= 0:
        return _adam(model.parameters(), cfg)
    muon = muon_params(model)
    ids = {id(p) for p in muon}
    graphed = uses_cuda_graph(muon[0].device.type, cuda_graph)
    return AdamMuon(_adam([p for p in model.parameters() if id(p) not in ids], cfg),
                    Muon(muon, lr=cfg.muon_lr, ns_steps=cfg.muon_ns_steps, cuda_graph=graphed))


def set_lr(opt: torch.optim.Optimizer | AdamMuon, step: int, total_steps: int, cfg: OptimConfig) -> None:
    """Every param group at its peak (optim.lr for Adam, optim.muon_lr for Muon) times the schedule."""
    peaks = [(opt.adam, cfg.lr), (opt.muon, cfg.muon_lr)] if isinstance(opt, AdamMuon) else [(opt, cfg.lr)]
    for optimizer, peak in peaks:
        lr = lr_at(step, total_steps, cfg, peak)
        for group in optimizer.param_groups:
            group["lr"] = lr


def lr_at(step: int, total_steps: int, cfg: OptimConfig, peak: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`, peaking at `peak`
    (default: optim.lr, Adam's).

    onecycle: linear warm-up to the peak over warmup_frac of the run, then linear decay
    to 0 at the last step; cosine: same warm-up, cosine decay to 0; constant: the peak
    throughout.
    """
    peak = cfg.lr if peak is None else peak
    if cfg.schedule == "constant":
        return peak
    warmup = int(cfg.warmup_frac * total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (1.0 - progress)
