"""`midol --version`, and the known-harmless library noise kept off the console."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning
import timm
import torch

import midol
from midol.cli import main
from midol.console import quiet_known_noise


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == (f"midol {midol.__version__} (torch {torch.__version__}, lightning "
                   f"{lightning.__version__}, timm {timm.__version__})")


def test_known_noise_is_silenced_but_other_warnings_are_not(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn("Found 103 module(s) in eval mode at the start of training. This may ...")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated")
        warnings.warn("a real problem")
    assert [str(w.message) for w in caught] == ["a real problem"]
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: For seamless cloud logging ...")
        log.info("GPU available: False, used: False")  # absent hardware: noise (issue 27 item 13)
        log.info("TPU available: False, using: 0 TPU cores")
        log.info("GPU available: True (cuda), used: True")
        log.info("the run's own line")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: True (cuda), used: True",
                                                        "the run's own line"]


def test_threads_option_and_busy_machine_warning(monkeypatch):
    import pytest

    from midol.cli import apply_threads
    from midol.errors import UsageError

    before = torch.get_num_threads()
    try:
        apply_threads(1)
        assert torch.get_num_threads() == 1
        with pytest.raises(UsageError, match="--threads must be >= 1"):
            apply_threads(0)
        monkeypatch.setattr("os.getloadavg", lambda: (9.0, 9.0, 9.0))
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
        with pytest.warns(UserWarning, match=r"load average 9.0 on 2 usable cores.*--threads 1"):
            apply_threads(None)
        monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0.2, 0.2))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            apply_threads(None)  # an idle machine: no warning
    finally:
        torch.set_num_threads(before)


def test_optimizer_and_lr_scheduler_options_are_not_offered(capsys, monkeypatch):
    import pytest

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    for option in ("--optimizer", "--lr_scheduler"):
        with pytest.raises(SystemExit) as exc:
            main(["fit", "--config", "configs/pretrain/demo.yaml", option, "torch.optim.SGD"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"unknown option {option.lstrip('-')!r}: midol's modules" in err, err[-500:]
