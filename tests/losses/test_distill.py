"""MedMIX distillation terms against plain float64 restatements."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from midol.losses.distill import cosine_distill_loss, logit_kl_loss


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ref_cosine(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> float:
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for m in range(s.shape[1]):
            if not mask[b, m]:
                continue
            x, y = s[b, m].tolist(), t[b, m].tolist()
            dot = sum(i * j for i, j in zip(x, y, strict=True))
            norm = math.sqrt(sum(i * i for i in x)) * math.sqrt(sum(j * j for j in y))
            total += 1 - dot / norm
            count += 1
    return total / count


@pytest.mark.parametrize("batch,inputs,dim", [(1, 1, 3), (4, 3, 8), (7, 2, 16)])
def test_cosine_distill_matches_restatement(batch: int, inputs: int, dim: int) -> None:
    g = seeded(batch * 100 + inputs)
    s = torch.randn(batch, inputs, dim, generator=g, dtype=torch.float64)
    t = torch.randn(batch, inputs, dim, generator=g, dtype=torch.float64)
    mask = torch.rand(batch, inputs, generator=g) > 0.3
    mask[0, 0] = True
    assert_close(cosine_distill_loss(s, t, mask),
                 torch.tensor(ref_cosine(s, t, mask), dtype=torch.float64))
    full = torch.ones(batch, inputs, dtype=torch.bool)
    assert_close(cosine_distill_loss(s, t), torch.tensor(ref_cosine(s, t, full),
                                                          dtype=torch.float64))
    # B x D form
    assert_close(cosine_distill_loss(s[:, 0], t[:, 0]),
                 torch.tensor(ref_cosine(s[:, :1], t[:, :1], full[:, :1]), dtype=torch.float64))


def test_cosine_distill_bounds_teacher_gradient_and_mask() -> None:
    s = torch.randn(3, 2, 5, generator=seeded(0))
    assert_close(cosine_distill_loss(s, 2 * s), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(cosine_distill_loss(s, -s), torch.tensor(2.0))
    student = s.clone().requires_grad_()
    teacher = torch.randn(3, 2, 5, generator=seeded(1)).requires_grad_()
    mask = torch.tensor([[True, False], [False, True], [True, True]])
    # absent entries may be NaN in both tensors: nothing changes, nothing leaks
    dirty_s = torch.where(mask.unsqueeze(-1), student, float("nan"))
    dirty_t = torch.where(mask.unsqueeze(-1), teacher, float("nan"))
    loss = cosine_distill_loss(dirty_s, dirty_t, mask)
    assert_close(loss, cosine_distill_loss(s, teacher.detach(), mask))
    assert not torch.allclose(loss, cosine_distill_loss(s, teacher.detach()))
    loss.backward()
    assert teacher.grad is None or float(teacher.grad.abs().sum()) == 0.0
    assert torch.isfinite(student.grad).all()
    assert torch.equal(student.grad[~mask], torch.zeros(int((~mask).sum()), 5))
    assert float(student.grad[mask].abs().sum()) > 0
    # no present entry: a zero that keeps the graph
    none = cosine_distill_loss(student, teacher, torch.zeros(3, 2, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
    with pytest.raises(ValueError):
        cosine_distill_loss(s, s[:, :1])


def ref_binary_kl(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    total = 0.0
    for x, y in zip(s.flatten().tolist(), t.flatten().tolist(), strict=True):
        ps, pt = 1 / (1 + math.exp(-x / temp)), 1 / (1 + math.exp(-y / temp))
        total += pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    return temp**2 * total / s.numel()


def ref_softmax_kl(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    total = 0.0
    for xs, ys in zip(s.tolist(), t.tolist(), strict=True):
        zs = sum(math.exp(x / temp) for x in xs)
        zt = sum(math.exp(y / temp) for y in ys)
        for x, y in zip(xs, ys, strict=True):
            ps, pt = math.exp(x / temp) / zs, math.exp(y / temp) / zt
            total += pt * math.log(pt / ps)
    return temp**2 * total / s.shape[0]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("multilabel", [True, False])
def test_logit_kl_matches_restatement(temperature: float, multilabel: bool) -> None:
    g = seeded(int(temperature * 10) + multilabel)
    s = torch.randn(6, 8, generator=g, dtype=torch.float64) * 2
    t = torch.randn(6, 8, generator=g, dtype=torch.float64) * 2
    ref = ref_binary_kl if multilabel else ref_softmax_kl
    assert_close(logit_kl_loss(s, t, temperature, multilabel=multilabel),
                 torch.tensor(ref(s, t, temperature), dtype=torch.float64))


@pytest.mark.parametrize("multilabel", [True, False])
def test_logit_kl_zero_at_match_teacher_detached_and_stable(multilabel: bool) -> None:
    t = torch.randn(4, 5, generator=seeded(3))
    assert_close(logit_kl_loss(t.clone(), t, 2.0, multilabel=multilabel), torch.tensor(0.0),
                 atol=1e-6, rtol=0)
    student = torch.randn(4, 5, generator=seeded(4)).requires_grad_()
    teacher = t.clone().requires_grad_()
    loss = logit_kl_loss(student, teacher, 2.0, multilabel=multilabel)
    assert loss.item() > 0
    loss.backward()
    assert teacher.grad is None
    assert float(student.grad.abs().sum()) > 0
    extreme = torch.tensor([[80.0, -80.0, 0.0]])
    assert torch.isfinite(logit_kl_loss(-extreme, extreme, multilabel=multilabel))
    with pytest.raises(ValueError):
        logit_kl_loss(student, teacher, 0.0, multilabel=multilabel)
