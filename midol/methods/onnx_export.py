"""ONNX export of a backbone or task model, checked against PyTorch at export (``midol export
... --onnx``; needs the ``onnx`` extra: ``pip install 'midol[onnx]'``).

The graph's input ``pixels`` is float32 ``B x 3 x H x W``: RGB scaled to [0, 1], then
``(x - mean) / std`` with the mean and std the part's JSON records (ImageNet's), exactly what
the timm backbone takes in PyTorch. Its output is the module's: pooled ``features`` (B x D) for
a backbone, ``logits`` for a task model. The batch axis is dynamic.

Parity: onnxruntime (CPU) runs the file on random normal inputs at batch sizes 1 and 3, at the
recorded image size and, where the PyTorch model also runs at twice that size, there too (the
file then keeps height and width free). A model whose traced graph does not hold at the second
size (shapes the tracer fixed: a random-init Swin-B traced at 224 px gives features 0.019 off at
448 px, without an error) is exported again for the recorded size only, and the result says
why. The largest absolute difference to PyTorch must
be <= 1e-4 (float32); otherwise no file is written and :class:`~midol.errors.OutputFileError`
names the part and the difference. The result goes into the part's JSON under ``onnx``.

A DEX routed-experts layer runs each expert only on the rows that chose it and skips an expert
that no row chose: a Python branch the tracer would freeze to the routing of the example
input. While exporting, its ``mix`` is the same computation without that branch (an expert with
no row runs on an empty tensor), so the routing stays data-dependent in the graph.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from midol.errors import OutputFileError, UsageError
from midol.io.atomic import atomic_path, atomic_write_text
from midol.models.dex import DEXLayer

ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-4  # max |ONNX - PyTorch|, float32
PARITY_BATCH_SIZES = (1, 3)
INSTALL_HINT = "pip install 'midol[onnx]'"
INPUT_NAME = "pixels"
INPUT_DESCRIPTION = ("float32 B x 3 x H x W: RGB scaled to [0, 1], then (x - mean) / std with "
                     "this file's mean and std; the batch axis is dynamic")


@dataclass
class OnnxParity:
    """What :func:`export_onnx` wrote and how closely onnxruntime reproduces PyTorch."""

    file: str  # the .onnx file's name (beside the JSON)
    opset: int
    input: str
    output: str
    dynamic_axes: list[str]  # input axes left free: batch, or batch, height and width
    sizes: list[int]  # square input sizes checked (px)
    batch_sizes: list[int]
    max_abs_diff: float  # over every size and batch size checked
    tolerance: float
    single_size_reason: str | None  # why only one size was checked, else None
    exporter: str = "torch.onnx (TorchScript tracer)"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _SecondSizeFails(Exception):
    """The graph exported with free height and width does not hold at the second size."""


def require_onnx() -> Any:
    """The ``onnxruntime`` module; a one-line :class:`UsageError` naming the extra when
    ``onnx`` or ``onnxruntime`` is missing."""
    try:
        import onnx  # noqa: F401  # torch.onnx's checks use it; its absence would fail late
        import onnxruntime
    except ImportError as err:
        missing = getattr(err, "name", None) or "onnx/onnxruntime"
        raise UsageError(f"ONNX export needs onnx and onnxruntime ({missing} is not installed): "
                         f"{INSTALL_HINT}") from err
    return onnxruntime


def _traceable_mix(layer: DEXLayer, x: torch.Tensor, gates: torch.Tensor,
                   indices: torch.Tensor) -> torch.Tensor:
    """:meth:`DEXLayer.mix` without the branch on an expert's row count (same sums, same order:
    an expert no row chose adds nothing)."""
    b, n, d = x.shape
    units = x.reshape(b * n, 1, d) if layer.token_routing else x
    out = torch.zeros_like(units)  # a DEX expert maps dim -> dim
    for e, expert in enumerate(layer.experts):
        rows, slot = torch.where(indices == e)
        y = expert(units[rows])
        out = out.index_add(0, rows, y * gates[rows, slot].to(y.dtype)[:, None, None])
    return out.reshape(b, n, -1)


@contextlib.contextmanager
def traceable(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with every DEX layer's ``mix`` replaced by :func:`_traceable_mix`, restored
    afterwards."""
    layers = [m for m in module.modules() if isinstance(m, DEXLayer)]
    for layer in layers:
        layer.__dict__["mix"] = functools.partial(_traceable_mix, layer)  # shadows the method
    try:
        yield module
    finally:
        for layer in layers:
            layer.__dict__.pop("mix", None)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def _runs_at(module: nn.Module, size: int) -> str | None:
    """None when the PyTorch module runs on a ``size`` px input, else why not."""
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, size, size))
    except Exception as err:  # any failure: the model does not take that size
        return _first_line(err)
    return None


def _export_file(module: nn.Module, path: Path, example: torch.Tensor, output_name: str,
                 output_ndim: int, dynamic_hw: bool, opset: int) -> None:
    spatial = {2: "height", 3: "width"} if dynamic_hw else {}
    out_spatial = {2: "out_height", 3: "out_width"} if dynamic_hw and output_ndim == 4 else {}
    axes = {INPUT_NAME: {0: "batch", **spatial}, output_name: {0: "batch", **out_spatial}}
    with traceable(module), torch.no_grad(), warnings.catch_warnings():
        # the tracer's notes on Python values it fixes and the exporter's deprecation notice: the
        # parity check below is what tells whether the graph holds
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # advanced indexing and index_add: DEX rows are >= 0 and distinct per expert (top-k
        # picks k distinct experts), the cases these notes warn about
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx\.")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[output_name],
                          dynamic_axes=axes, do_constant_folding=True)


def _parity(ort: Any, module: nn.Module, path: Path, name: str, sizes: Sequence[int],
            batch_sizes: Sequence[int], tolerance: float, seed: int) -> float:
    """Max |ONNX - PyTorch| over ``sizes`` x ``batch_sizes``; :class:`OutputFileError` beyond
    ``tolerance`` at the first size, :class:`_SecondSizeFails` at a later one."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for i, size in enumerate(sizes):
        for batch in batch_sizes:
            x = torch.randn(batch, 3, size, size, generator=generator)
            with torch.no_grad():
                expected = module(x).float().numpy()
            where = f"batch {batch}, {size} px"
            try:
                got = np.asarray(session.run(None, {INPUT_NAME: x.numpy()})[0])
            except Exception as err:  # onnxruntime's own errors have no common class
                if i > 0:
                    raise _SecondSizeFails(f"onnxruntime fails at {where}: {_first_line(err)}") from err
                raise OutputFileError(f"ONNX export of {name}: onnxruntime fails at {where}: "
                                      f"{_first_line(err)}; no .onnx written") from err
            diff = (float(np.abs(got.astype(np.float64) - expected).max())
                    if got.shape == expected.shape else float("inf"))
            if not diff <= tolerance:  # NaN too
                shape = "" if got.shape == expected.shape else (
                    f" (output shape {got.shape}, PyTorch's {expected.shape})")
                message = f"max |ONNX - PyTorch| = {diff:.3g} > {tolerance:g} at {where}{shape}"
                if i > 0:
                    raise _SecondSizeFails(message)
                raise OutputFileError(f"ONNX export of {name}: {message}; no .onnx written")
            worst = max(worst, diff)
    return worst


def export_onnx(
    module: nn.Module,
    path: str | Path,
    image_size: int,
    name: str,
    output_name: str = "features",
    opset: int = ONNX_OPSET,
    tolerance: float = PARITY_TOLERANCE,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    seed: int = 0,
) -> OnnxParity:
    """Write ``module`` (normalised ``B x 3 x H x W`` float32 in, one tensor out) to ``path``
    with a dynamic batch axis and check it with onnxruntime (module docstring); the file is
    written only when the check passes. ``name`` (the part) is what errors name."""
    ort = require_onnx()
    target = Path(path)
    was_training = module.training
    module.eval()
    try:
        second = 2 * image_size
        torch_fails = _runs_at(module, second)
        reason = None if torch_fails is None else (
            f"the PyTorch model does not run at {second} px ({torch_fails})")
        example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            output = module(example)
        if not isinstance(output, torch.Tensor):
            raise UsageError(f"ONNX export of {name}: the module returns {type(output).__name__}, "
                             "not one tensor")
        attempts = [[image_size]] if reason else [[image_size, second], [image_size]]
        for sizes in attempts:
            dynamic_hw = len(sizes) > 1
            try:
                with atomic_path(target) as tmp:
                    try:
                        _export_file(module, tmp, example, output_name, output.ndim, dynamic_hw, opset)
                    except Exception as err:  # the exporter's errors have no common class
                        raise OutputFileError(f"ONNX export of {name}: torch.onnx.export fails: "
                                              f"{_first_line(err)}") from err
                    diff = _parity(ort, module, tmp, name, sizes, batch_sizes, tolerance, seed)
            except _SecondSizeFails as err:
                reason = f"the graph traced with free height and width does not hold at {second} px: {err}"
                continue
            return OnnxParity(
                file=target.name, opset=opset, input=INPUT_NAME, output=output_name,
                dynamic_axes=["batch", "height", "width"] if dynamic_hw else ["batch"],
                sizes=list(sizes), batch_sizes=list(batch_sizes), max_abs_diff=diff,
                tolerance=tolerance,
                single_size_reason=None if dynamic_hw else f"{image_size} px only: {reason}",
            )
        raise AssertionError("unreachable: the single-size attempt returns or raises")
    finally:
        module.train(was_training)


def record_onnx(meta_path: str | Path, parity: OnnxParity) -> Path:
    """Add ``parity`` to an export's JSON under ``onnx`` (rewritten atomically)."""
    path = Path(meta_path)
    meta = json.loads(path.read_text())
    meta["onnx"] = {**parity.to_json(), "input_description": INPUT_DESCRIPTION}
    return atomic_write_text(path, json.dumps(meta, indent=2) + "\n")


def export_part_onnx(module: nn.Module, safetensors_path: str | Path, name: str) -> OnnxParity:
    """:func:`export_onnx` of an exported part beside its ``<name>.safetensors``, at the image
    size its JSON records, and the result recorded in that JSON."""
    meta_path = Path(safetensors_path).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    parity = export_onnx(module, meta_path.with_suffix(".onnx"), int(meta["image_size"]), name)
    record_onnx(meta_path, parity)
    return parity
