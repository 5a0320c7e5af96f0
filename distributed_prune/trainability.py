"""Trainability measures: Jacobian singular values (JSV) and trainability accuracy (TA).

docs/science.md section 3: the sparsifying action damages *dynamical isometry*, measured by the singular
values of the input-output Jacobian ``J_i = d logits(x_i) / d x_i`` (shape ``(C, D)``, ``C`` the number
of logits, ``D`` the input numel) of each sample ``x_i``.  The mean JSV falls monotonically with the
pruning ratio.  The model is evaluated in eval mode (BatchNorm uses running statistics), so each
sample's logits depend on that sample only.

Typical use::

    from distributed_prune.trainability import jsv, trainability_accuracy
    stats = jsv(model, images[:32])          # {"mean", "std", "max", "min", "cond"}
    ta = trainability_accuracy(top1_per_epoch, first_stage_epochs=60)
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from distributed_prune.errors import UserError

__all__ = ["jsv", "trainability_accuracy", "EXACT_MAX_JACOBIAN_NUMEL"]

# "auto" computes the Jacobian exactly when it has fewer entries per sample than this.
EXACT_MAX_JACOBIAN_NUMEL = 2_000_000
# Upper bound on Jacobian entries materialised at once by the exact method (chunking over samples).
_EXACT_CHUNK_NUMEL = 1 << 24


def jsv(model: nn.Module, inputs: torch.Tensor, *, method: str = "auto", num_projections: int = 64,
        seed: int = 0, max_samples: int | None = None, lanczos_steps: int = 20,
        batch_size: int = 256) -> dict[str, float]:
    """Statistics of the singular values of the per-sample input-output Jacobian.

    Args:
        model: classifier, ``model(x)`` of shape ``(N, C)`` (trailing dims are flattened). It is run in
            eval mode; the training flags of all submodules are restored afterwards. Its parameters
            are never modified and no ``.grad`` is written.
        inputs: ``(N, *input_shape)``, moved to the model's device and dtype.
        method: ``"exact"``, ``"randomized"`` or ``"auto"`` (exact when ``C * D`` is below
            ``EXACT_MAX_JACOBIAN_NUMEL``, else randomized).
        num_projections: randomized only: Rademacher probe vectors per sample.
        seed: randomized only: seed of the probe vectors (a private generator; the global RNG is
            untouched).
        max_samples: use only the first ``max_samples`` inputs.
        lanczos_steps: randomized only: Lanczos iterations per probe (capped at ``min(C, D)``).
        batch_size: randomized only: (sample, probe) pairs per forward/backward pass.

    Returns:
        ``{"mean", "std", "max", "min", "cond"}`` as floats.  With ``r = min(C, D)`` singular values
        per sample, all ``N * r`` values are pooled: ``mean``/``std`` (population std) / ``max`` /
        ``min`` are over the pool.  ``cond`` is the per-sample condition number
        ``s_max / s_min`` averaged over samples, where ``s_min`` is floored at ``eps * s_max``
        (``eps`` of the model dtype), so a rank-deficient Jacobian reads ``1 / eps`` (8.4e6 for
        float32) instead of infinity, and an all-zero Jacobian also reads ``1 / eps``.

    Methods:
        exact: ``vmap(jacrev(f))`` gives every ``J_i`` (``N x C x D`` entries, chunked), then
            ``torch.linalg.svdvals`` in float64.  Memory ``O(C * D)`` per sample.
        randomized: stochastic Lanczos quadrature (SLQ) on the ``r x r`` Gram matrix
            ``A_i = J_i J_i^T`` (if ``C <= D``, else ``J_i^T J_i``), whose eigenvalues are the squared
            singular values.  Matrix-vector products use one VJP and one JVP (no Jacobian is formed).
            For each probe ``v`` (Rademacher), ``m`` Lanczos steps with full reorthogonalisation give
            a tridiagonal ``T = Q diag(theta) Q^T``; ``v^T f(A) v ~ r * sum_j Q[0, j]^2 f(theta_j)``.
            Estimates per sample: mean JSV ``tr(A^{1/2}) / r`` and mean squared JSV ``tr(A) / r``
            (Hutchinson, unbiased up to the quadrature error), ``max``/``min`` as the extreme Ritz
            values over all probes.  Bias: when ``m >= r`` the quadrature is exact and the only error
            is Hutchinson noise (relative std ~ sqrt(2 / num_projections) per sample, shrinking with
            ``N``), and max/min are exact.  When ``m < r``, the ``m``-node Gauss quadrature of
            ``sqrt`` (steep at 0) tends to *overestimate* the mean when many eigenvalues are near 0
            (ResNet18, 1000 classes, 64x64 inputs: +4% at m = 20, +2% at m = 40); ``max`` is accurate
            (Ritz values converge fast at the top) but ``min`` is biased *upwards* (Ritz values lie
            inside the spectrum), hence ``cond`` is biased *downwards*; ``std`` comes from
            ``E[s^2] - E[s]^2`` (``E[s^2]`` is quadrature-exact) and inherits the mean's error.
            The batched estimate assumes samples do not interact in eval mode (true for standard
            CNNs; not for models that mix samples in the forward pass).
    """
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise UserError("jsv: inputs must be a tensor of shape (N, *input_shape)")
    if method not in ("auto", "exact", "randomized"):
        raise UserError(f"jsv: unknown method {method!r}; valid: auto, exact, randomized")
    if max_samples is not None:
        if max_samples < 1:
            raise UserError(f"jsv: max_samples must be >= 1, got {max_samples}")
        inputs = inputs[:max_samples]
    if inputs.shape[0] == 0:
        raise UserError("jsv: no input samples")
    if num_projections < 1 or lanczos_steps < 1 or batch_size < 1:
        raise UserError("jsv: num_projections, lanczos_steps and batch_size must be >= 1")

    ref = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), inputs)
    dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
    x = inputs.detach().to(device=ref.device, dtype=dtype)

    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        # Detached parameters: autograd never reaches the module's own tensors, so no .grad appears.
        state = {k: v.detach() for k, v in model.named_parameters()}
        state.update({k: v.detach() for k, v in model.named_buffers()})

        def f(xb: torch.Tensor) -> torch.Tensor:  # (B, *in) -> (B, C)
            out = functional_call(model, state, (xb,))
            return out.reshape(out.shape[0], -1)

        with torch.no_grad():
            num_classes = f(x[:1]).shape[1]
        d = x[0].numel()
        if method == "auto":
            method = "exact" if num_classes * d < EXACT_MAX_JACOBIAN_NUMEL else "randomized"
        if method == "exact":
            per_sample = _exact(f, x, num_classes)
        else:
            with warnings.catch_warnings():
                # torch's forward-AD decompositions call torch.jit.script on first use (torch 2.x).
                warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated",
                                        category=FutureWarning)
                per_sample = _randomized(f, x, num_classes, num_projections, lanczos_steps, seed,
                                         batch_size)
    finally:
        for m, flag in flags:
            m.training = flag
    return _pool(*per_sample, eps=torch.finfo(dtype).eps)


def _exact(f, x: torch.Tensor, num_classes: int):
    """Per-sample (mean s, mean s^2, max s, min s) from full Jacobians; each a (N,) float64 tensor."""
    def single(xi):  # (*in) -> (C,)
        return f(xi.unsqueeze(0)).squeeze(0)

    per_jac = jacrev(single)
    chunk = max(1, _EXACT_CHUNK_NUMEL // max(1, num_classes * x[0].numel()))
    svs = []
    for xb in x.split(chunk):
        jac = vmap(per_jac)(xb)  # (n, C, *in)
        svs.append(torch.linalg.svdvals(jac.reshape(jac.shape[0], num_classes, -1).double()))
    s = torch.cat(svs)  # (N, r)
    return s.mean(1), s.square().mean(1), s.amax(1), s.amin(1)


def _randomized(f, x: torch.Tensor, num_classes: int, num_probes: int, steps: int, seed: int,
                batch_size: int):
    """SLQ estimates per sample (see ``jsv``); each output a (N,) float64 tensor."""
    n, in_shape = x.shape[0], x.shape[1:]
    d = x[0].numel()
    r = min(num_classes, d)
    out_space = num_classes <= d  # Lanczos on J J^T (vectors in R^C) or J^T J (vectors in R^D)
    m = min(steps, r)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Probe b belongs to sample b // num_probes.
    probes = torch.randint(0, 2, (n * num_probes, r), generator=gen, dtype=torch.float64) * 2 - 1
    owner = torch.arange(n).repeat_interleave(num_probes)
    tol = math.sqrt(torch.finfo(x.dtype).eps)

    est_mean, est_msq, est_max, est_min = [], [], [], []
    for start in range(0, n * num_probes, batch_size):
        idx = slice(start, start + batch_size)
        xb = x[owner[idx].to(x.device)]  # (B, *in)
        _, vjp_fn = vjp(f, xb)

        def matvec(u: torch.Tensor) -> torch.Tensor:  # (B, r) float64 -> (B, r) float64
            u = u.to(x.dtype)
            if out_space:
                g = vjp_fn(u)[0]                       # J^T u: (B, *in)
                w = jvp(f, (xb,), (g,))[1]             # J J^T u: (B, C)
            else:
                t = jvp(f, (xb,), (u.reshape(-1, *in_shape),))[1]  # J u: (B, C)
                w = vjp_fn(t)[0].reshape(u.shape[0], -1)           # J^T J u: (B, D)
            return w.double()

        theta, tau, valid = _lanczos(matvec, probes[idx].to(x.device), m, tol)
        est_mean.append((tau * theta.clamp_min(0).sqrt()).sum(1))
        est_msq.append((tau * theta).sum(1))
        est_max.append(torch.where(valid, theta, -math.inf).amax(1))
        est_min.append(torch.where(valid, theta, math.inf).amin(1))

    def per_sample(vals: list[torch.Tensor], reduce: str) -> torch.Tensor:
        v = torch.cat(vals).cpu().reshape(n, num_probes)
        return getattr(v, reduce)(1)

    mean = per_sample(est_mean, "mean")
    msq = per_sample(est_msq, "mean")
    smax = per_sample(est_max, "amax").clamp_min(0).sqrt()
    smin = per_sample(est_min, "amin").clamp_min(0).sqrt()
    return mean, msq, smax, smin


def _lanczos(matvec, v: torch.Tensor, m: int, tol: float):
    """Batched Lanczos with full reorthogonalisation on the PSD operator ``matvec``.

    Args:
        v: (B, r) float64 start vectors; m: steps (<= r); tol: relative breakdown threshold.
    Returns:
        theta, tau, valid: (B, m) Ritz values, Gauss quadrature weights (``Q[0, j]^2``, summing to
        1) and a validity mask.  Elements whose Krylov space closed after ``k < m`` steps have their
        last ``m - k`` slots padded with ``theta = 0``, ``tau = 0``, ``valid = False``.
    """
    bsz = v.shape[0]
    q = v / v.norm(dim=1, keepdim=True)
    basis = [q]
    alphas, betas = [], []
    q_prev = torch.zeros_like(q)
    beta_prev = torch.zeros(bsz, dtype=v.dtype, device=v.device)
    active = torch.ones(bsz, dtype=torch.bool, device=v.device)
    n_valid = torch.full((bsz,), m, dtype=torch.long, device=v.device)
    scale = torch.zeros(bsz, dtype=v.dtype, device=v.device)
    for j in range(m):
        w = matvec(q)
        alpha = (w * q).sum(1)
        w = w - alpha[:, None] * q - beta_prev[:, None] * q_prev
        qs = torch.stack(basis, 1)  # (B, j+1, r)
        for _ in range(2):  # twice is enough for orthogonality to working precision
            w = w - torch.einsum("bk,bkr->br", torch.einsum("bkr,br->bk", qs, w), qs)
        alphas.append(torch.where(active, alpha, 0.0))
        if j == m - 1:
            break
        beta = w.norm(dim=1)
        scale = torch.maximum(scale, alpha.abs())
        closed = active & (beta <= tol * scale)
        n_valid[closed] = j + 1
        active = active & ~closed
        beta = torch.where(active, beta, 0.0)
        betas.append(beta)
        q_prev, q = q, torch.where(active[:, None], w / beta.clamp_min(1e-300)[:, None], 0.0)
        beta_prev = beta
        basis.append(q)

    a = torch.stack(alphas, 1)  # (B, m)
    t = torch.diag_embed(a)
    if betas:
        b = torch.stack(betas, 1)  # (B, m-1)
        t = t + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)
    theta = torch.zeros(bsz, m, dtype=v.dtype, device=v.device)
    tau = torch.full((bsz, m), math.nan, dtype=v.dtype, device=v.device)  # nan marks padding
    for k in n_valid.unique().tolist():  # eigh of the leading k x k block, grouped by k
        sel = n_valid == k
        evals, evecs = torch.linalg.eigh(t[sel][:, :k, :k])
        theta[sel, :k] = evals
        tau[sel, :k] = evecs[:, 0, :].square()
    valid = ~tau.isnan()
    return theta, tau.nan_to_num(nan=0.0), valid


def _pool(mean, msq, smax, smin, *, eps: float) -> dict[str, float]:
    """Pool per-sample statistics (equal count r per sample) into the reported dict."""
    mu = mean.mean()
    var = (msq.mean() - mu * mu).clamp_min(0)
    floor = torch.maximum(smin, eps * smax)
    cond = torch.where(smax > 0, smax / floor.clamp_min(torch.finfo(floor.dtype).tiny),
                       torch.full_like(smax, 1 / eps))
    return {"mean": float(mu), "std": float(var.sqrt()), "max": float(smax.max()),
            "min": float(smin.min()), "cond": float(cond.mean())}


def trainability_accuracy(top1_by_epoch: list[float], first_stage_epochs: int) -> float:
    """Trainability accuracy (TA): mean test top-1 over the first ``N`` retraining epochs.

    docs/science.md section 3: ``N`` is the length of the first LR stage (e.g. 60 for
    ``0:0.01,60:0.001,90:0.0001``); compare TA only between runs with the same schedule shape.

    Args:
        top1_by_epoch: test accuracy after each retraining epoch, in epoch order.
        first_stage_epochs: ``N >= 1``.
    Raises:
        UserError: ``N < 1`` or fewer than ``N`` epochs recorded.
    """
    n = first_stage_epochs
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"trainability_accuracy: first_stage_epochs must be an integer >= 1, got {n!r}")
    if len(top1_by_epoch) < n:
        raise UserError(f"trainability_accuracy: need accuracies for the first {n} retraining epochs "
                        f"(the first LR stage), got {len(top1_by_epoch)}")
    return float(sum(float(a) for a in top1_by_epoch[:n]) / n)
