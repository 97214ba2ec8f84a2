"""The idle-expert warning repeats while experts stay idle (rate-limited) and whenever another
expert falls idle, so a silent epoch means recovery, not a warning given once per run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from midol.callbacks import RoutingMonitor
from midol.methods.interfaces import ExpertChoice

NUM_EXPERTS, MODALITIES = 4, ["xray", "ct"]


def _counts(idle: set[int]) -> torch.Tensor:
    """Flat expert x modality counts of one epoch: 10 images per active expert and modality,
    none for the idle experts."""
    table = torch.tensor([[0 if e in idle else 10] * len(MODALITIES) for e in range(NUM_EXPERTS)])
    return table.flatten().long()


def _run_epochs(monitor: RoutingMonitor, idle_per_epoch: list[set[int]]) -> list[int]:
    """Feed the monitor's epoch end one fake epoch after another; the epochs that warned."""
    pl_module = SimpleNamespace(log_dict=lambda *args, **kwargs: None)
    monitor._modalities = list(MODALITIES)
    warned: list[int] = []
    for epoch, idle in enumerate(idle_per_epoch):
        monitor._choices = {"route_top1": ExpertChoice(torch.zeros(1, dtype=torch.long), NUM_EXPERTS,
                                                       collapse_check=False, idle_check=True,
                                                       label="teacher router top-1")}
        monitor._counts = {"route_top1": _counts(idle)}
        trainer = SimpleNamespace(current_epoch=epoch, global_step=10 * epoch, is_global_zero=True,
                                  loggers=[])
        before = len(monitor.warnings)
        monitor.on_train_epoch_end(trainer, pl_module)  # type: ignore[arg-type]
        if len(monitor.warnings) > before:
            warned.append(epoch)
    return warned


def test_idle_warning_repeats_while_idle_and_when_the_idle_set_changes() -> None:
    monitor = RoutingMonitor(idle_repeat_epochs=3, log_images=False)
    sequence = [{3}, {3}, {2, 3}, {1, 3}, {3}, {3}, {3}, set(), {3}, {1, 3}]
    with pytest.warns(UserWarning, match="RoutingMonitor: idle experts"):
        warned = _run_epochs(monitor, sequence)
    # 0: first; 2: expert 2 falls idle; 3: expert 1 falls idle (same count, another set);
    # 4-5: a subset of the last warning, within 3 epochs: silent; 6: 3 epochs after the last
    # warning, still idle; 7: recovered (silent); 8: idle again at once; 9: expert 1 again
    assert warned == [0, 2, 3, 6, 8, 9]
    idle = [w for w in monitor.warnings if w.startswith("idle experts")]
    assert len(idle) == 6
    assert idle[0].startswith("idle experts: in epoch 0 the teacher router top-1 gave experts [3] "
                              "less than 1% of the images (only 3 of 4 in use; loads ")
    assert "experts [1, 3]" in idle[2] and "idle since epoch 0" in idle[2]
    assert "in epoch 6" in idle[3] and "idle since epoch 0" in idle[3]
    assert "idle since" not in idle[4]  # epoch 8 starts a new idle spell
    assert idle[0].endswith("Repeated every 3 epoch(s) while experts stay idle and whenever "
                            "another falls idle; silence means recovery.")


def test_idle_warning_is_rate_limited_while_nothing_changes() -> None:
    monitor = RoutingMonitor(idle_repeat_epochs=2, log_images=False)
    with pytest.warns(UserWarning, match="idle experts"):
        warned = _run_epochs(monitor, [{0, 1}] * 7)
    assert warned == [0, 2, 4, 6]
