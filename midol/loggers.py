"""Loggers: W&B that goes offline by itself when no API key is configured."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


def wandb_credentials_available() -> bool:
    """An API key in the environment or a ``wandb login`` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger; ``offline=None`` (default) means offline when no API key is
    set, so a run never stalls on a login prompt. Sync later with ``wandb sync``."""

    def __init__(
        self,
        project: str = "midol",
        name: str | None = None,
        save_dir: str = ".",
        offline: bool | None = None,
        log_model: bool = False,
        entity: str | None = None,
        tags: list[str] | None = None,
        group: str | None = None,
        **kwargs: Any,
    ):
        if offline is None:
            offline = not wandb_credentials_available()
        super().__init__(
            project=project, name=name, save_dir=save_dir, offline=offline, log_model=log_model,
            entity=entity, tags=tags, group=group, **kwargs,
        )
