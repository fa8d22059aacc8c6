"""The fused loss kernels (posttrain.fast.loss_kernels through posttrain.fast.fused_loss) on CPU under
TRITON_INTERPRET=1: cross-entropy sum, per-token log-probs and entropy, and their gradients w.r.t. the hidden
states and the head, against a float64 computation and against the chunked path. The vocab (300) spans three
kernel blocks of 128 with a partial last one, so the online softmax's rescaling and the edge masks are
exercised; rows without a target (−100) and several row chunks are included. GPU speed and bf16 equality at
the 1B shape are recorded by bench/sft_gpu.py's loss_kernels section."""

import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import torch

    import posttrain.fast.loss_kernels as kernels

    kernels.BLOCK_V = 128  # several blocks per row at a small vocab
    from posttrain.fast.chunked_loss import chunked_token_cross_entropy_sum, chunked_token_logprobs

    def rel(x, ref):
        return float((x.double() - ref).norm() / ref.norm())

    g = torch.Generator().manual_seed(0)
    n, d, v, temperature = 37, 24, 300, 0.7
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 2e-2)):
        h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
        w = (0.5 * torch.randn(v, d, generator=g)).to(dtype).requires_grad_()
        y = torch.randint(0, v, (n,), generator=g)
        y[::5] = -100
        h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        z = h64 @ w64.T
        ce = torch.logsumexp(z, -1) - z.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
        ref = ce[y != -100].sum()
        (0.7 * ref).backward()
        got = {}
        for impl in ("chunked", "fused"):
            h.grad = w.grad = None
            total, count = chunked_token_cross_entropy_sum(h, w, y, 16, impl)
            (0.7 * total).backward()
            assert int(count) == int((y != -100).sum())
            got[impl] = (total.detach(), h.grad.clone(), w.grad.clone())
            assert abs(float(total) - float(ref)) / float(ref) < tol, (dtype, impl, float(total), float(ref))
            assert rel(h.grad, h64.grad) < tol and rel(w.grad, w64.grad) < tol, (dtype, impl, "grads")
        if dtype == torch.float32:
            for a, b in zip(got["fused"], got["chunked"]):
                assert rel(a, b.double()) < 1e-6

        targets = y.clamp_min(0)
        g_logp, g_entropy = torch.randn(n, generator=g), torch.randn(n, generator=g)
        h64.grad = w64.grad = None
        log_probs = torch.log_softmax(h64 @ w64.T / temperature, -1)
        logp_ref = log_probs.gather(1, targets[:, None]).squeeze(1)
        entropy_ref = -(log_probs.exp() * log_probs).sum(-1)
        ((logp_ref * g_logp).sum() + (entropy_ref * g_entropy).sum()).backward()
        for impl in ("chunked", "fused"):
            h.grad = w.grad = None
            logp, entropy = chunked_token_logprobs(h, w, targets, temperature, 16, impl)
            ((logp * g_logp).sum() + (entropy * g_entropy).sum()).backward()
            errors = [rel(logp, logp_ref), rel(entropy, entropy_ref), rel(h.grad, h64.grad), rel(w.grad, w64.grad)]
            assert max(errors) < tol, (dtype, impl, errors)
        # only the log-probs carry a gradient (entropy unused): the kernel's zero entropy gradient path
        h.grad = w.grad = None
        h64.grad = w64.grad = None
        chunked_token_logprobs(h, w, targets, temperature, 16, "fused")[0].sum().backward()
        log_probs = torch.log_softmax(h64 @ w64.T / temperature, -1)
        log_probs.gather(1, targets[:, None]).sum().backward()
        assert rel(h.grad, h64.grad) < tol and rel(w.grad, w64.grad) < tol, (dtype, "logp only")
    print("ok")
    """
)


def test_fused_loss_kernels_match_float64_and_chunked_in_interpreter(run_in_triton_interpreter):
    run_in_triton_interpreter(SCRIPT)
