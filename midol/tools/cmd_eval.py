"""``midol eval --suite SUITE.yaml --backbones A [B ...] --out DIR``: the evaluation report card
of frozen backbones — kNN, linear and few-shot probes on every task of a suite (one prediction per
group for a group task, plus attention-MIL over the group's images), bootstrap 95 %
CIs, paired comparisons against the random init of each architecture and a baseline, with one
verdict per pair from a rule stated before any number.

Options may come from a YAML file (``--config eval.yaml``) and be overridden on the command
line; ``--print_config`` shows them all. Features are cached (``--cache_dir``): a second run
with one more backbone embeds only that backbone.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from midol.errors import UsageError

DEFAULT_CACHE = os.path.join("outputs", "eval_cache")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="midol eval", description=__doc__.split("\n\n")[0],
                            default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    parser.add_argument("--suite", type=str, required=True,
                        help="suite YAML (configs/eval/shared_data.yaml, medmnist_plus.yaml, paper21.yaml)")
    parser.add_argument("--backbones", type=str, nargs="+", required=True,
                        help="backbones as [LABEL=]SPEC: a midol .ckpt[:part], an export .safetensors "
                             "or folder, local-dir:DIR, timm:NAME[,k=v]@WEIGHTS, random:NAME[,k=v]")
    parser.add_argument("--out", type=str, required=True, help="output folder of the report")
    parser.add_argument("--protocols", type=str, default="knn,linear,fewshot,mil",
                        help="comma-separated protocols: knn, linear, fewshot, mil (attention-MIL: "
                             "tasks with label_level: group only; finetune: see the README)")
    parser.add_argument("--shots", type=str, default="1,5,10,25",
                        help="few-shot: labelled examples per class, comma-separated")
    parser.add_argument("--fractions", type=str, default="0.01,0.1,1.0",
                        help="few-shot: label fractions of the training split (1.0 = the linear protocol)")
    parser.add_argument("--seeds", type=int, default=5, help="seeded draws per few-shot setting (>= 1; 5 recommended)")
    parser.add_argument("--baseline", type=str | None, default=None,
                        help="label of the backbone every other one is compared with")
    parser.add_argument("--metric", type=str, default="auc",
                        help="primary metric: comparisons, verdicts and figures (auc, acc, bal_acc, f1, kappa, aupr)")
    parser.add_argument("--knn_k", type=str, default="10,20", help="kNN neighbour counts, comma-separated")
    parser.add_argument("--knn_temperature", type=float, default=0.07, help="kNN vote temperature T (DINO: 0.07)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the test split (>= 1000 for the report)")
    parser.add_argument("--tasks", type=str, nargs="+", default=None, help="run only these tasks of the suite")
    parser.add_argument("--data_root", type=str | None, default=None,
                        help="folder relative source paths start from (default: the suite's data_root)")
    parser.add_argument("--pretrain_groups", type=bool, default=False,
                        help="backbones labelled NAME@SEED are the pre-training seeds of one row NAME: "
                             "paired by seed, random references at the same seeds, intervals resample "
                             "seeds and test samples")
    parser.add_argument("--random_references", type=bool, default=True,
                        help="add the seeded random init of every architecture that appears")
    parser.add_argument("--cache_dir", type=str, default=DEFAULT_CACHE, help="feature cache folder")
    parser.add_argument("--cache_key", type=Literal["stat", "content"], default="stat",
                        help="match cached rows to files by path+size+mtime (stat: free) or by a "
                             "hash of the bytes (content: reads every file once; sees any edit)")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu or cuda[:n] (bf16 autocast on CUDA)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--num_workers", type=int, default=0, help="image-decoding workers")
    parser.add_argument("--threads", type=int | None, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--format", type=str, nargs="+", default=["png"], help="figure formats: png, pdf, svg")
    parser.add_argument("--dpi", type=int, default=100, help="raster resolution of the figures")
    parser.add_argument("--wandb_project", type=str | None, default=None,
                        help="also log runs.csv and the verdicts as W&B tables to this project")
    return parser


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"--{name} needs integers >= 1, got {text!r}")
    return values


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{name} must be comma-separated numbers, got {text!r}") from None
    if any(not 0.0 < v <= 1.0 for v in values):
        raise UsageError(f"--{name} must lie in (0, 1], got {text!r}")
    return values


def options_from(cfg: Any) -> Any:
    """Checked :class:`~midol.evaluation.runner.Options` from the parsed namespace."""
    from midol.evaluation.metrics import METRICS
    from midol.evaluation.runner import PROTOCOLS, Options

    protocols = [p.strip() for p in str(cfg.protocols).split(",") if p.strip()]
    if "finetune" in protocols:
        raise UsageError("--protocols finetune is not available in midol eval yet: fine-tune with "
                         "`midol fit --config configs/finetune/...` (README, 'Fine-tuning')")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise UsageError(f"--protocols: unknown {unknown or protocols}; choose from {', '.join(PROTOCOLS)}")
    if cfg.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {cfg.seeds}")
    if cfg.bootstrap < 100:
        raise UsageError(f"--bootstrap must be >= 100 (1000 for a report), got {cfg.bootstrap}")
    if cfg.knn_temperature <= 0:
        raise UsageError(f"--knn_temperature must be > 0, got {cfg.knn_temperature}")
    metrics = sorted({m for names in METRICS.values() for m in names})
    if cfg.metric not in metrics:
        raise UsageError(f"--metric {cfg.metric!r} is not one of {', '.join(metrics)}")
    return Options(protocols=protocols, shots=_ints(cfg.shots, "shots"),
                   fractions=_floats(cfg.fractions, "fractions"), seeds=cfg.seeds,
                   knn_k=_ints(cfg.knn_k, "knn_k"), knn_temperature=cfg.knn_temperature,
                   bootstrap=cfg.bootstrap, metric=cfg.metric, baseline=cfg.baseline,
                   pretrain_groups=cfg.pretrain_groups)


def _commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def main(argv: list[str]) -> int:
    cfg = build_parser().parse_args(argv)
    import torch

    import midol
    from midol.analysis.inputs import pick_device
    from midol.analysis.plotting import set_output
    from midol.evaluation import features as feats
    from midol.evaluation import report
    from midol.evaluation.runner import EvalWarning, evaluate
    from midol.evaluation.suite import load_suite
    from midol.run_guard import check_writable

    options = options_from(cfg)
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    set_output(tuple(cfg.format), cfg.dpi)
    device = str(pick_device(cfg.device))
    suite = load_suite(cfg.suite, cfg.data_root, cfg.tasks)
    # Both outputs are checked before any image is embedded: an unwritable cache would
    # otherwise fail only after the first full feature pass.
    check_writable(cfg.out, "--out")
    check_writable(cfg.cache_dir, "--cache_dir")
    refs = [feats.parse_backbone(text) for text in cfg.backbones]
    labels = [r.label for r in refs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"backbone labels must be unique, got {labels}; name them LABEL=SPEC")
    groups = [label.rsplit("@", 1)[0] if options.pretrain_groups else label for label in labels]
    seeds = sorted({label.rsplit("@", 1)[1] for label in labels if options.pretrain_groups and "@" in label})
    if any(not s.isdigit() for s in seeds):
        raise UsageError(f"--pretrain_groups: labels are NAME@SEED with an integer SEED, got seeds {seeds}")
    if options.baseline is not None and options.baseline not in groups:
        raise UsageError(f"--baseline {options.baseline!r} is not one of the backbones {sorted(set(groups))}")
    loaded = [feats.load(r) for r in refs]
    if cfg.random_references:
        loaded = feats.add_references(loaded, [int(s) for s in seeds] or None)
    else:
        for b in loaded:
            b.ref.reference = b.ref.spec.checkpoint is None
    embedder = feats.Embedder(cfg.cache_dir, device, cfg.batch_size, cfg.num_workers, cfg.cache_key)
    start = dt.datetime.now(dt.timezone.utc)
    default_show = warnings.showwarning

    def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if issubclass(category, EvalWarning):  # one plain line, not the source line behind it
            print(f"midol eval: warning: {message}", file=sys.stderr)
        else:
            default_show(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always", EvalWarning)
        warnings.showwarning = show
        results = evaluate(suite, loaded, embedder, options, options.baseline,
                           progress=lambda m: print(f"midol eval: {m}", file=sys.stderr))
    seconds = (dt.datetime.now(dt.timezone.utc) - start).total_seconds()
    provenance: dict[str, Any] = {
        "suite": suite.name, "suite_file": suite.path, "date": start.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "midol eval " + shlex.join(argv), "commit": _commit(), "midol": midol.__version__,
        "device": _device_name(device), "cache_dir": cfg.cache_dir, "seconds": round(seconds, 1),
        "features": {"computed": embedder.computed, "reused": embedder.reused},
        "backbones": feats.provenance_rows(loaded),
    }
    path = report.write(cfg.out, results, options, provenance)
    if cfg.wandb_project:
        _log_wandb(cfg.wandb_project, results, provenance)
    print(f"midol eval: {len(results.runs)} scores in {seconds:.0f} s (features: "
          f"{embedder.computed} images embedded, {embedder.reused} from the cache); report: {path}")
    return 0


def _log_wandb(project: str, results: Any, provenance: dict[str, Any]) -> None:
    import wandb

    run = wandb.init(project=project, job_type="eval", config={"provenance": provenance})
    fields: list[str | int] = list(results.runs[0]) if results.runs else []
    run.log({"eval/runs": wandb.Table(columns=fields, data=[list(r.values()) for r in results.runs])})
    keys: list[str | int] = ["task", "setting", "row", "against", "kind", "metric", "diff", "lo",
                             "hi", "p", "verdict"]
    run.log({"eval/comparisons": wandb.Table(columns=keys, data=[[c.get(k) for k in keys]
                                                                   for c in results.comparisons])})
    run.finish()
