"""midol: pre-training and evaluation of multi-modality medical image foundation models."""

__version__ = "0.2.0"
