"""DataWaitMonitor: the waiting fraction from the hook times, the worker count that would feed
the model (W / (1 - f)), and the warning in a real (data-bound) fit."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from midol.callbacks.data_wait import DataWaitMonitor, workers_needed


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Module:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: float, **_: object) -> None:
        self.logged[name] = value


class _Trainer:
    train_dataloader = type("Loader", (), {"num_workers": 4})()


def _steps(monitor: DataWaitMonitor, clock: _Clock, module: _Module, n: int, wait: float, busy: float) -> None:
    batch = {"views": [torch.zeros(8, 3, 2, 2)]}
    for i in range(n):
        clock.now += wait
        monitor.on_train_batch_start(_Trainer(), module, batch, i)  # type: ignore[arg-type]
        clock.now += busy
        monitor.on_train_batch_end(_Trainer(), module, None, batch, i)  # type: ignore[arg-type]


def test_fraction_and_rate_from_hook_times() -> None:
    clock, module = _Clock(), _Module()
    monitor = DataWaitMonitor(window=4, warn_fraction=0.5)
    monitor.clock = clock
    monitor.on_train_epoch_start(_Trainer(), module)  # type: ignore[arg-type]
    _steps(monitor, clock, module, 4, wait=9.0, busy=1.0)  # warm-up window: not counted
    assert "perf/data_wait" not in module.logged
    _steps(monitor, clock, module, 4, wait=0.3, busy=0.1)
    assert module.logged["perf/data_wait"] == pytest.approx(0.75)
    assert module.logged["perf/images_per_s"] == pytest.approx(4 * 8 / 1.6)
    assert monitor.warned  # 0.75 > 0.5


def test_no_warning_below_the_threshold() -> None:
    clock, module = _Clock(), _Module()
    monitor = DataWaitMonitor(window=2, warn_fraction=0.1)
    monitor.clock = clock
    _steps(monitor, clock, module, 6, wait=0.01, busy=0.99)
    assert module.logged["perf/data_wait"] == pytest.approx(0.01)
    assert not monitor.warned


@pytest.mark.parametrize(("workers", "fraction", "expected"),
                         [(8, 0.5, 16), (8, 0.0, 8), (4, 0.75, 16), (0, 0.3, 1), (10, 0.01, 11)])
def test_workers_needed(workers: int, fraction: float, expected: int) -> None:
    assert workers_needed(workers, fraction) == expected


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="warn_fraction"):
        DataWaitMonitor(warn_fraction=1.0)
    with pytest.raises(ValueError, match="window"):
        DataWaitMonitor(window=0)


class _Slow(Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.02)  # decoding that the model outruns
        return torch.full((4,), float(i))


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Slow(), batch_size=2, num_workers=0)


def test_a_data_bound_fit_is_named(tmp_path) -> None:
    monitor = DataWaitMonitor(window=3, warn_fraction=0.5)
    trainer = L.Trainer(max_epochs=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"data-bound; about 1 worker\(s\)"):
        trainer.fit(_Tiny())
    assert monitor.last_fraction is not None and monitor.last_fraction > 0.5
