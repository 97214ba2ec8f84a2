"""A Hugging Face style model card (``README.md``) in the timm local-dir folder of an export.

The card is filled only from files that exist: the export's JSON, the checkpoint (method class,
hyper-parameters, step, epoch, images seen, the log folders it records), the run's
``config.yaml`` (corpus sources, batch size, planned length), ``summary.json`` and
``routing_table.md`` of the run folder (:class:`~midol.callbacks.pretrain_summary.PretrainSummary`),
a ``fit.log`` with the start-up corpus table, and a ``midol eval`` ``report.md`` when one is
given. What none of them records is written as "not recorded"; no number is invented. Files
are read, never the upper layers imported (this module sits in ``methods/``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

import midol
from midol.io.atomic import atomic_write_text
from midol.utils.run_logs import LOG_DIRS_KEY, recorded_log_dirs, run_folder

NOT_RECORDED = "not recorded"
CARD_FILE = "README.md"


def timm_dir_of(export_path: str | Path) -> Path:
    """``<out>/<part>_timm`` of ``<out>/<part>.safetensors``."""
    path = Path(export_path)
    return path.with_name(f"{path.stem}_timm")


def write_model_card(
    export_path: str | Path,
    method: Any,
    part: str,
    checkpoint_path: str | Path | None = None,
    eval_report: str | Path | None = None,
) -> Path | None:
    """Write ``<part>_timm/README.md`` beside ``export_path`` (``<part>.safetensors``); returns
    its path, or None when the part has no timm folder (DEX routed experts)."""
    folder = timm_dir_of(export_path)
    if not folder.is_dir():
        return None
    meta = json.loads(Path(export_path).with_suffix(".json").read_text())
    checkpoint: dict[str, Any] = {}
    if checkpoint_path is not None:
        import torch

        loaded = torch.load(str(checkpoint_path), map_location="cpu", weights_only=True)
        checkpoint = loaded if isinstance(loaded, dict) else {}
    run = RunFiles.find(checkpoint_path, checkpoint)
    text = render_card(folder, meta, method, part, checkpoint, run,
                       Path(eval_report) if eval_report is not None else None)
    target = folder / CARD_FILE
    atomic_write_text(target, text)
    return target


class RunFiles:
    """The files of the run that wrote a checkpoint (each None when not found)."""

    def __init__(self, folder: Path | None, config: Path | None, summary: Path | None,
                 routing: Path | None, fit_log: Path | None):
        self.folder = folder
        self.config = config
        self.summary = summary
        self.routing = routing
        self.fit_log = fit_log

    @classmethod
    def find(cls, checkpoint_path: str | Path | None, checkpoint: dict[str, Any]) -> RunFiles:
        if checkpoint_path is None:
            return cls(None, None, None, None, None)
        record = checkpoint.get(LOG_DIRS_KEY)
        root = record.get("root") if isinstance(record, dict) else None
        here = run_folder(checkpoint_path)
        folders = [Path(root)] if root and Path(root).is_dir() else []
        if here not in folders:
            folders.append(here)
        config = None
        for log_dir in reversed(recorded_log_dirs(checkpoint)):
            candidates = [Path(log_dir) / "config.yaml"]
            if root:
                relative = os.path.relpath(log_dir, root)
                if not relative.startswith(os.pardir):
                    candidates.append(here / relative / "config.yaml")
            config = next((c for c in candidates if c.is_file()), None)
            if config is not None:
                break

        def first(name: str) -> Path | None:
            return next((f / name for f in folders if (f / name).is_file()), None)

        return cls(folders[0], config, first("summary.json"), first("routing_table.md"),
                   first("fit.log"))


def render_card(folder: Path, meta: dict[str, Any], method: Any, part: str,
                checkpoint: dict[str, Any], run: RunFiles, eval_report: Path | None) -> str:
    """The card's Markdown (YAML front matter first)."""
    cls = type(method)
    class_path = f"{cls.__module__}.{cls.__qualname__}"
    hparams = dict(checkpoint.get("hyper_parameters") or getattr(method, "hparams", {}) or {})
    hparams.pop("_class_path", None)
    config = _read_yaml(run.config)
    summary = _read_json(run.summary)
    method_tag = cls.__name__.lower()
    method_tag = "m-idol" if method_tag == "midol" else method_tag
    front = {
        "library_name": "timm",
        "tags": ["midol", "medical-imaging", method_tag],
        "license": "<fill in>",
        "pipeline_tag": "image-feature-extraction",
    }
    size = meta.get("image_size")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {folder.name}: {meta.get('timm_model')} pre-trained with midol ({cls.__name__})", "",
             f"{(meta.get('description') or part).rstrip('.')}. Exported by midol "
             f"{midol.__version__} from `{meta.get('source') or NOT_RECORDED}`.", "",
             "## Load it", "", "```python", "import timm", "",
             f'model = timm.create_model("local-dir:{folder}", pretrained=True)', "```", "",
             "Once this folder is uploaded to the Hugging Face Hub, "
             '`timm.create_model("hf-hub:<user>/<repo>", pretrained=True)` loads it the same way.',
             "",
             "The model has no classifier head (`num_classes=0`): it returns pooled features. "
             "`timm.data.resolve_data_config({}, model=model)` gives the input size, mean and std "
             "below.", "",
             "## Architecture", "", "| | |", "|---|---|",
             f"| timm model | `{meta.get('timm_model')}` |",
             f"| overrides | `{json.dumps(meta.get('overrides') or {})}` |",
             f"| exported part | `{part}` |"]
    module = _part_module(method, part)
    features = getattr(module, "num_features", None)
    lines += [f"| feature dimension | {features if features is not None else NOT_RECORDED} |",
              f"| image size | {size if size is not None else NOT_RECORDED} px |",
              f"| mean | {meta.get('mean', NOT_RECORDED)} |",
              f"| std | {meta.get('std', NOT_RECORDED)} |",
              f"| input | {meta.get('input', NOT_RECORDED)} |", ""]
    lines += ["## Method", "", f"`{class_path}`, with these hyper-parameters (from the "
              f"{'checkpoint' if checkpoint.get('hyper_parameters') else 'loaded method'}):", "",
              "| hyper-parameter | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in hparams.items()] or [f"| — | {NOT_RECORDED} |"]
    lines += [""] + _training(checkpoint, method, config, summary)
    lines += _corpus(config, run)
    lines += ["## Routing table", ""]
    if run.routing is not None:
        lines += [f"Images of the corpus per expert (rows) and modality, from `{run.routing}`:", "",
                  run.routing.read_text().strip(), ""]
    else:
        lines += [f"{NOT_RECORDED} (no `routing_table.md` in the run folder; a method without a "
                  "router has none).", ""]
    lines += _evaluation(eval_report)
    lines += ["## Licence and citation", "",
              "* Licence of these weights: <fill in> (check the licences of every data source "
              "above).",
              "* Intended use and limitations: <fill in> (a research backbone, not a medical "
              "device).",
              "* Citation: <fill in>.", ""]
    return "\n".join(lines)


def _training(checkpoint: dict[str, Any], method: Any, config: dict[str, Any] | None,
              summary: dict[str, Any] | None) -> list[str]:
    trainer = _section(config, "trainer")
    data = _init_args(_section(config, "data"))
    seen = getattr(method, "images_seen", None)
    images = int(seen) if seen is not None else (summary or {}).get("images_seen")

    def rec(value: Any) -> str:
        return NOT_RECORDED if value is None else _cell(value)

    lines = ["## Training", "", "| | |", "|---|---|",
             f"| optimiser steps | {rec(checkpoint.get('global_step'))} |",
             f"| epoch counter at the checkpoint | {rec(checkpoint.get('epoch'))} |",
             f"| images seen | {rec(images)} |",
             f"| batch size per device | {rec(data.get('batch_size'))} |",
             f"| devices | {rec(trainer.get('devices'))} |",
             f"| accumulate_grad_batches | {rec(trainer.get('accumulate_grad_batches'))} |",
             f"| planned max_steps | {rec(trainer.get('max_steps'))} |",
             f"| planned max_epochs | {rec(trainer.get('max_epochs'))} |",
             f"| precision | {rec(trainer.get('precision'))} |"]
    for key, value in (summary or {}).items():
        if key.startswith("final_"):
            lines.append(f"| {key.replace('_', ' ')} | {rec(value)} |")
    return lines + [""]


def _corpus(config: dict[str, Any] | None, run: RunFiles) -> list[str]:
    sources = _init_args(_section(config, "data")).get("sources")
    counts = _start_up_table(run.fit_log)
    lines = ["## Pre-training corpus", ""]
    if not isinstance(sources, list) or not sources:
        lines += [f"{NOT_RECORDED} (no `config.yaml` of the run was found through the "
                  "checkpoint's log folders).", ""]
        if counts:
            lines += [f"The start-up table of `{run.fit_log}`:", "", *counts, ""]
        return lines
    lines += ["| source | modality | kind | weight | images | share of draws |",
              "|---|---|---|---:|---:|---:|"]
    rows = {r[0]: r for r in (_split_row(line) for line in counts) if len(r) >= 6}
    for raw in sources:
        s = _init_args(raw) if isinstance(raw, dict) else {}
        path = str(s.get("path", NOT_RECORDED))
        row = rows.get(path)
        images, share = (row[3], row[5]) if row else (NOT_RECORDED, NOT_RECORDED)
        lines.append(f"| {path} | {s.get('modality', NOT_RECORDED)} | {s.get('kind', 'auto')} | "
                     f"{_cell(s.get('weight', 1.0))} | {images} | {share} |")
    note = (f"Image counts and draw shares from the start-up table of `{run.fit_log}`."
            if rows else f"Image counts and draw shares: {NOT_RECORDED} (no fit log with the "
            "start-up corpus table was found in the run folder).")
    return lines + ["", f"Sources from `{run.config}`. {note}", ""]


def _evaluation(report: Path | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if report is None:
        return lines + [f"{NOT_RECORDED} (no `midol eval` report was given: `midol export ... "
                        "--eval_report outputs/eval/report.md`).", ""]
    text = report.read_text()
    title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("# ")),
                 "midol eval")
    match = re.search(r"^## Suite-level verdicts.*?(?=^## |\Z)", text, flags=re.M | re.S)
    if match is None:
        return lines + [f"`{report}` ({title}) has no suite-level verdict table; see the report.", ""]
    return lines + [f"From the `midol eval` report `{report}` ({title}); the verdict rule and "
                    "per-task tables are in that report.", "", "#" + match.group(0).strip(), ""]


def _start_up_table(fit_log: Path | None) -> list[str]:
    """The rows of the last ``pre-training corpus:`` table in a fit log (empty: none)."""
    if fit_log is None:
        return []
    found: list[str] = []
    lines = fit_log.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if line.strip().endswith("pre-training corpus:"):
            table = []
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    break
                table.append(row)
            found = table or found
    return found


def _split_row(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _part_module(method: Any, part: str) -> Any:
    modules = getattr(method, "export_modules", None)
    if modules is None:
        return None
    export = modules().get(part)
    return getattr(export, "module", None)


def _section(config: dict[str, Any] | None, key: str) -> dict[str, Any]:
    value = (config or {}).get(key)
    return value if isinstance(value, dict) else {}


def _init_args(value: dict[str, Any]) -> dict[str, Any]:
    args = value.get("init_args")
    return args if isinstance(args, dict) else value


def _read_yaml(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else None


def _read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else None


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return f"`{text}`".replace("|", "\\|") if isinstance(value, (dict, list, tuple)) else str(text)
