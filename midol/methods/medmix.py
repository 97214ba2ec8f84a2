"""Moved (midol 0.2): see :data:`midol.legacy.MOVED_MODULES`; the old names resolve with a
DeprecationWarning until 0.4."""

from midol.legacy import module_getattr

__getattr__ = module_getattr("midol.methods.medmix")
