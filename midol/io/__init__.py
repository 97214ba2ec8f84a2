"""Files: reading weights safely, writing exports, atomic writes."""

from midol.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from midol.io.export import BackboneExport, export_backbone, export_checkpoint, export_method
from midol.io.weights import load_state_dict_file

__all__ = [
    "BackboneExport",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "export_backbone",
    "export_checkpoint",
    "export_method",
    "load_state_dict_file",
]
