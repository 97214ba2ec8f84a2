"""Per-term gradient norms (``grad_norm_every``): the helper against plain backward passes, and
the values a short fit logs before and after clipping."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from midol.optim.grad_norms import term_grad_norms, total_norm
from tests.helpers.tiny import tiny_datamodule, tiny_module


def test_term_grad_norms_equal_separate_backward_passes() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(4, 6)
    out = net(x)
    terms = {"a": 7.0 * out.pow(2).sum(), "b": out[:, 0].mean(), "c": torch.ones(())}
    params = list(net.parameters())
    norms = term_grad_norms(terms, params)
    for name in ("a", "b"):
        net.zero_grad()
        terms[name].backward(retain_graph=True)
        expected = torch.cat([p.grad.flatten() for p in params]).norm()
        torch.testing.assert_close(norms[name], expected)
    assert float(norms["c"]) == 0.0  # no dependence on the parameters
    net.zero_grad()
    (terms["a"] + terms["b"]).backward()  # the graph is still there for the real backward
    assert float(total_norm(p.grad for p in params)) > 0
    assert float(total_norm([None])) == 0.0


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()
                          if k.startswith("grad/")})


@pytest.mark.parametrize("clip_mode", ["global", "per_param"])
def test_fit_logs_term_norms_and_clip_effect(clip_mode: str) -> None:
    module = tiny_module(grad_norm_every=2, clip_mode=clip_mode, route_weight=1.0)
    rec = Recorder()
    clip = 0.05  # small, so the clip acts on the tiny model
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=clip,
              max_steps=3, callbacks=[rec]).fit(module, tiny_datamodule())
    first = rec.rows[0]
    assert set(first) == {"grad/norm_before_clip", "grad/norm_after_clip",
                          "grad/backbone_l_cst", "grad/backbone_l_route"}
    assert first["grad/backbone_l_route"] > 0 and first["grad/backbone_l_cst"] > 0
    assert first["grad/norm_before_clip"] > first["grad/norm_after_clip"]
    if clip_mode == "global":
        assert first["grad/norm_after_clip"] == pytest.approx(clip, rel=1e-3)
    n_tensors = sum(1 for p in module.parameters() if p.requires_grad)
    assert first["grad/norm_after_clip"] <= clip * n_tensors**0.5 + 1e-6
    # step 1 is not measured, so its values are the ones of step 0; step 2 measures again
    assert rec.rows[1] == first and rec.rows[2] != first


def test_grad_norm_every_rejects_negative() -> None:
    with pytest.raises(ValueError, match="grad_norm_every"):
        tiny_module(grad_norm_every=-1)
