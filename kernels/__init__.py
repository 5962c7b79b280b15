"""Token log-probs and the OPD loss straight from hidden states and the LM head.

    logp, entropy = token_logprobs(hidden [N, H], weight [V, H], targets [N], temperature=1.0)
    loss, stats   = opd_loss(hidden, weight, targets, logp_sampler, logp_teacher, mask, scale, temperature=1.0)

Both pick the fused Triton path (kernels/fused.py) when it can run on the tensors given (CUDA, or
CPU under TRITON_INTERPRET=1) and the pure-torch reference (kernels/ref.py) otherwise.
`get_impl("triton" | "torch" | "auto")` returns the pair (token_logprobs, opd_loss) to use.
"""
from .ref import opd_loss_ref, token_logprobs_ref

try:
    from . import fused
    FUSED_ERROR = None
except ImportError as e:  # no usable Triton here: the references still work
    fused, FUSED_ERROR = None, f"{type(e).__name__}: {e}"


def triton_usable(t):
    """Whether the Triton kernels can run on tensor t."""
    return fused is not None and (t.is_cuda or fused.INTERPRET)


def token_logprobs(hidden, weight, targets, temperature=1.0):
    impl = fused.token_logprobs_triton if triton_usable(hidden) else token_logprobs_ref
    return impl(hidden, weight, targets, temperature)


def opd_loss(hidden, weight, targets, logp_sampler, logp_teacher, mask, scale, temperature=1.0):
    impl = fused.opd_loss_triton if triton_usable(hidden) else opd_loss_ref
    return impl(hidden, weight, targets, logp_sampler, logp_teacher, mask, scale, temperature)


token_logprobs.__doc__ = token_logprobs_ref.__doc__
opd_loss.__doc__ = opd_loss_ref.__doc__


def get_impl(name="auto"):
    """(token_logprobs, opd_loss) for name in {"triton", "torch", "auto"}."""
    if name == "torch":
        return token_logprobs_ref, opd_loss_ref
    if name == "triton":
        if fused is None:
            raise RuntimeError("--impl triton needs the triton package; install it or use --impl torch")
        return fused.token_logprobs_triton, fused.opd_loss_triton
    if name == "auto":
        return token_logprobs, opd_loss
    raise ValueError(f"unknown impl {name!r}; use 'triton', 'torch' or 'auto'")
