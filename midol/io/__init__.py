"""File formats: reading weights safely, atomic writes, crash-safe checkpoints. Method export
lives in :mod:`midol.methods.export` (old names here resolve with a DeprecationWarning)."""

from midol.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from midol.io.weights import load_state_dict_file
from midol.legacy import module_getattr

__getattr__ = module_getattr("midol.io")

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_state_dict_file",
]
