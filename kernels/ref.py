"""Pure-torch references for kernels/fused.py: the ground truth in tests and `--impl torch` in opd.py.

Same signatures and outputs as the Triton versions. They compute in fp32 (fp64 inputs stay fp64)
and never hold [N, V] logits: tokens go in chunks of `chunk_rows`, each under activation
checkpointing, so forward and backward both keep at most one [chunk_rows, V] block alive.
"""
import functools

import torch
from torch.utils.checkpoint import checkpoint


def _check(hidden, weight, targets, temperature, used=None):
    """Clear errors for bad inputs; used: the targets that are read (opd_loss: where mask != 0), default all."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}; flatten hidden to 2-D first")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"need targets [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype or not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden and weight must share one float dtype, got {hidden.dtype} and "
                         f"{weight.dtype}; cast them first")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"hidden, weight, targets must be on one device, got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    bad = (targets < 0) | (targets >= weight.shape[0])
    if used is not None:
        bad &= used
    if targets.numel() and bool(bad.any()):  # one host sync, as before `used`: opd_loss runs every micro-batch
        raise ValueError(f"targets must lie in [0, {weight.shape[0]}); check the tokenizer's vocab size")


def _check_loss_args(targets, logp_sampler, logp_teacher, mask):
    """The loss's per-token inputs: one value per target."""
    for name, t in (("logp_sampler", logp_sampler), ("logp_teacher", logp_teacher), ("mask", mask)):
        if t.shape != targets.shape:
            raise ValueError(f"{name} must have shape [N] = [{targets.shape[0]}], got {tuple(t.shape)}")


def _chunk(h, w, y, temperature):
    z = (h @ w.t()) / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = (z.gather(1, y[:, None]).squeeze(1) - lse).clamp(max=0.0)
    ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, ent


def token_logprobs_ref(hidden, weight, targets, temperature=1.0, *, chunk_rows=1024):
    """log p(target) and entropy per token (fp32 [N]; fp64 for fp64 inputs) of softmax(h W^T / T)."""
    _check(hidden, weight, targets, temperature)
    dt = torch.promote_types(hidden.dtype, torch.float32)
    h, w = hidden.to(dt), weight.to(dt)  # upcast once: grads of w accumulate over chunks in fp32
    grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    out = [checkpoint(_chunk, h[i:i + chunk_rows], w, targets[i:i + chunk_rows], temperature, use_reentrant=False)
           if grad else _chunk(h[i:i + chunk_rows], w, targets[i:i + chunk_rows], temperature)
           for i in range(0, h.shape[0], chunk_rows)]
    if not out:  # no tokens: [0]-shaped, still attached to both inputs (zero grads, not None)
        empty = h.sum(1) + 0 * w.sum()
        return empty, empty
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def opd_loss_ref(hidden, weight, targets, logp_sampler, logp_teacher, mask, scale, temperature=1.0, *,
                 chunk_rows=1024, logprobs=None):
    """loss = -scale * sum_t m_t ratio_t adv_t with kl = ls - lt, adv = -kl, ratio = exp(logp - ls).

    Stats as in opd_loss_triton: logp / entropy / ratio are 0 where mask == 0, kl everywhere. Targets where
    mask == 0 are never read (any value, e.g. -100). logprobs: the token_logprobs the loss is built on (default
    token_logprobs_ref; fused.py's fp16 path passes its kernel).
    """
    _check_loss_args(targets, logp_sampler, logp_teacher, mask)
    idx = torch.nonzero(mask).squeeze(1)  # masked tokens cost nothing
    logprobs = logprobs or functools.partial(token_logprobs_ref, chunk_rows=chunk_rows)
    logp_c, ent_c = logprobs(hidden[idx], weight, targets[idx], temperature)
    ls, lt, m = (t.detach().to(logp_c.dtype) for t in (logp_sampler, logp_teacher, mask))
    ratio_c = torch.exp(logp_c - ls[idx])
    kl_c = ls[idx] - lt[idx]
    loss = scale * (m[idx] * ratio_c * kl_c).sum()  # = -scale * sum m ratio adv, adv = -kl
    zeros = torch.zeros_like(ls)
    stats = {"logp": zeros.index_copy(0, idx, logp_c.detach()), "entropy": zeros.index_copy(0, idx, ent_c.detach()),
             "ratio": zeros.index_copy(0, idx, ratio_c.detach()), "kl": ls - lt}
    return loss, stats
