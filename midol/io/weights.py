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
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError and friends
        raise ValueError(
            f"{path} could not be loaded with weights_only=True (it may contain arbitrary "
            f"Python objects, which midol refuses to unpickle): {err}"
        ) from err
