"""Distillation divergences against float64 references: values, bounds, limits, chunking, top-k caches."""

import math

import pytest
import torch

from posttrain.algorithms.distill import (
    distillation_loss,
    generalized_jsd,
    kl_divergence,
    token_divergence,
    topk_distributions,
)

f64 = torch.float64


def logprobs(values):
    return torch.tensor(values, dtype=f64).log()


def binary_entropy(beta):
    return -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)


def test_kl_hand_values():
    p, q = logprobs([0.5, 0.5, 0.0]), logprobs([0.25, 0.25, 0.5])
    assert kl_divergence(p, q).item() == pytest.approx(math.log(2), abs=1e-15)  # 0 · log 0 adds nothing
    assert kl_divergence(q, p).item() == math.inf  # q has mass where p has none
    assert kl_divergence(q, q).item() == 0.0
    # forward KL(p_T‖p_S) and reverse KL(p_S‖p_T), by name
    assert token_divergence(q, p, "forward_kl").item() == pytest.approx(math.log(2), abs=1e-15)
    assert token_divergence(p, q, "reverse_kl").item() == pytest.approx(math.log(2), abs=1e-15)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_hand_values_and_bounds(beta):
    # disjoint supports attain the upper bound h(β); identical distributions give 0
    teacher, student = logprobs([1.0, 0.0]), logprobs([0.0, 1.0])
    assert generalized_jsd(student, teacher, beta).item() == pytest.approx(binary_entropy(beta), abs=1e-15)
    assert generalized_jsd(teacher, teacher, beta).item() == pytest.approx(0.0, abs=1e-15)
    # a hand-written β = 0.5 case: M = [0.5, 0.25, 0.25]
    teacher, student = logprobs([0.5, 0.5, 0.0]), logprobs([0.5, 0.0, 0.5])
    if beta == 0.5:
        expected = 0.5 * (0.5 * math.log(0.5 / 0.5) + 0.5 * math.log(0.5 / 0.25)) * 2
        assert generalized_jsd(student, teacher, beta).item() == pytest.approx(expected, abs=1e-15)
    torch.manual_seed(0)
    student = torch.log_softmax(torch.randn(50, 11, dtype=f64) * 3, -1)
    teacher = torch.log_softmax(torch.randn(50, 11, dtype=f64) * 3, -1)
    jsd = generalized_jsd(student, teacher, beta)
    assert (jsd >= 0).all() and (jsd <= binary_entropy(beta)).all()


def test_jsd_limits_are_forward_and_reverse_kl():
    torch.manual_seed(1)
    student = torch.log_softmax(torch.randn(20, 9, dtype=f64), -1)
    teacher = torch.log_softmax(torch.randn(20, 9, dtype=f64), -1)
    small = 1e-7
    torch.testing.assert_close(
        generalized_jsd(student, teacher, small) / small, kl_divergence(teacher, student), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        generalized_jsd(student, teacher, 1 - small) / small,
        kl_divergence(student, teacher),
        rtol=1e-5,
        atol=0,
    )
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(student, teacher, 0.0)


def reference_loss(student_logits, teacher_logits, mask, divergence, beta, temperature):
    """Straight float64: log-softmax both, sum over the vocabulary, mean over masked tokens."""
    student = torch.log_softmax(student_logits.double() / temperature, -1)
    teacher = torch.log_softmax(teacher_logits.double() / temperature, -1)
    p_s, p_t = student.exp(), teacher.exp()
    if divergence == "forward_kl":
        per_token = (p_t * (teacher - student)).sum(-1)
    elif divergence == "reverse_kl":
        per_token = (p_s * (student - teacher)).sum(-1)
    else:
        m = beta * p_t + (1 - beta) * p_s
        per_token = beta * (p_t * (teacher - m.log())).sum(-1) + (1 - beta) * (p_s * (student - m.log())).sum(
            -1
        )
    return per_token[mask].sum() / mask.sum()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_full_teacher_loss_and_gradient_match_float64_reference(divergence, chunk_size):
    torch.manual_seed(2)
    student = torch.randn(3, 5, 17, dtype=f64, requires_grad=True)
    teacher = torch.randn(3, 5, 17, dtype=f64)
    mask = torch.rand(3, 5) < 0.6
    mask[0, 0] = True
    loss = distillation_loss(
        student,
        mask,
        teacher_logits=teacher,
        divergence=divergence,
        beta=0.3,
        temperature=2.0,
        chunk_size=chunk_size,
    )
    (grad,) = torch.autograd.grad(loss, student)
    expected = reference_loss(student, teacher, mask, divergence, 0.3, 2.0)
    (grad_ref,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-14)
    assert loss.item() > 0
    assert grad[~mask].abs().sum() == 0


def test_low_precision_logits_are_computed_in_float32():
    torch.manual_seed(3)
    student = torch.randn(2, 4, 33).to(torch.bfloat16).requires_grad_()
    teacher = torch.randn(2, 4, 33).to(torch.bfloat16)
    mask = torch.ones(2, 4, dtype=torch.bool)
    loss = distillation_loss(student, mask, teacher_logits=teacher, chunk_size=3)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    expected = reference_loss(student, teacher, mask, "forward_kl", 0.5, 1.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def reference_topk(student_logits, teacher_logits, k, tail):
    """The top-k cache semantics written out in float64: explicit bucket / renormalised distributions."""
    student = torch.softmax(student_logits.double(), -1)
    teacher = torch.softmax(teacher_logits.double(), -1)
    ids = teacher.topk(k, -1).indices
    s_k, t_k = student.gather(-1, ids), teacher.gather(-1, ids)
    if tail == "bucket":
        s = torch.cat([s_k, 1 - s_k.sum(-1, keepdim=True)], -1)
        t = torch.cat([t_k, 1 - t_k.sum(-1, keepdim=True)], -1)
    else:
        s, t = s_k / s_k.sum(-1, keepdim=True), t_k / t_k.sum(-1, keepdim=True)
    return ids, teacher.gather(-1, ids).log(), (t * (t.log() - s.log())).sum(-1)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_topk_teacher_cache_matches_written_out_reference(tail):
    torch.manual_seed(4)
    student = torch.randn(2, 6, 40, dtype=f64, requires_grad=True)
    teacher = torch.randn(2, 6, 40, dtype=f64) * 2
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    ids, cached, per_token = reference_topk(student, teacher, k=5, tail=tail)
    loss = distillation_loss(
        student, mask, teacher_topk_ids=ids, teacher_topk_logprobs=cached, topk_tail=tail, chunk_size=4
    )
    expected = per_token[mask].mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-14)
    (grad,) = torch.autograd.grad(loss, student)
    (grad_ref,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-14)
    if tail == "bucket":  # coarse-graining can only lose divergence (data processing inequality)
        full = distillation_loss(student, mask, teacher_logits=teacher)
        assert loss.item() <= full.item()


def test_topk_distributions_are_normalised():
    torch.manual_seed(5)
    student = torch.log_softmax(torch.randn(4, 30, dtype=f64), -1)
    teacher = torch.log_softmax(torch.randn(4, 30, dtype=f64), -1)
    cached, ids = teacher.topk(6, -1)
    for tail, outcomes in (("bucket", 7), ("renormalize", 6)):
        s, t = topk_distributions(student, ids, cached, tail)
        assert s.shape[-1] == t.shape[-1] == outcomes
        torch.testing.assert_close(s.exp().sum(-1), torch.ones(4, dtype=f64), rtol=0, atol=1e-14)
        torch.testing.assert_close(t.exp().sum(-1), torch.ones(4, dtype=f64), rtol=0, atol=1e-14)


def test_bad_input_is_named():
    student = torch.randn(2, 3, 5)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="teacher_logits"):
        distillation_loss(student, mask)
    with pytest.raises(ValueError, match="vocabulary"):
        distillation_loss(student, mask, teacher_logits=torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="beta"):
        distillation_loss(student, mask, teacher_logits=student, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, mask, teacher_logits=student, temperature=0.0)
    ids = torch.arange(5).expand(2, 3, 5)
    with pytest.raises(ValueError, match="k=5"):
        distillation_loss(student, mask, teacher_topk_ids=ids, teacher_topk_logprobs=torch.zeros(2, 3, 5))


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_chunking_saves_no_full_vocab_float32_tensor(divergence):
    """Every float32 tensor autograd keeps is one chunk; the full [B, T, V] buffer kept is bf16 (the gradient)."""
    batch, length, vocab, chunk = 2, 8, 64, 3
    student = torch.randn(batch, length, vocab).to(torch.bfloat16).requires_grad_()
    teacher = torch.randn(batch, length, vocab).to(torch.bfloat16)
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tensor.numel()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = distillation_loss(
            student,
            torch.ones(batch, length, dtype=torch.bool),
            teacher_logits=teacher,
            divergence=divergence,
            chunk_size=chunk,
        )
    loss.backward()
    float32_sizes = [numel for dtype, numel in saved if dtype == torch.float32]
    assert float32_sizes and max(float32_sizes) <= chunk * vocab
    assert (torch.bfloat16, batch * length * vocab) in saved


def test_micro_batch_losses_sum_to_the_full_batch_loss():
    torch.manual_seed(6)
    student = torch.randn(4, 5, 11, dtype=f64)
    teacher = torch.randn(4, 5, 11, dtype=f64)
    mask = torch.rand(4, 5) < 0.7
    full = distillation_loss(student, mask, teacher_logits=teacher, divergence="reverse_kl")
    parts = [
        distillation_loss(
            student[rows],
            mask[rows],
            teacher_logits=teacher[rows],
            divergence="reverse_kl",
            num_tokens_global=mask.sum(),
        )
        for rows in (slice(0, 1), slice(1, 4))
    ]
    torch.testing.assert_close(sum(parts), full, rtol=0, atol=1e-14)
