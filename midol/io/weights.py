"""Reading weight files safely: safetensors, or torch files with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_state_dict_file(path: str | Path) -> dict[str, Any]:
    """Load a local weights file without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    from midol.errors import truncated_checkpoint_error

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for short files
            damaged = truncated_checkpoint_error(path, err)
            if damaged is not None:
                raise damaged from err
            raise
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError and friends
        damaged = truncated_checkpoint_error(path, err)
        if damaged is not None:  # an interrupted copy, not a malicious pickle
            raise damaged from err
        raise ValueError(
            f"{path} could not be loaded with weights_only=True (it may contain arbitrary "
            f"Python objects, which midol refuses to unpickle): {err}"
        ) from err
