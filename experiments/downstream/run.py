"""New runs score frozen-probe tasks (linear_probe: true) with midol eval; fine-tuning tasks still train through Lightning.

Run downstream configs over N seeds for several backbones; write a markdown table of
mean ± std per metric with the two-sided t-test p-value between the best two (paper Table 3).

    python experiments/downstream/run.py experiments/downstream/demo_medmnist_linear.yaml
    python experiments/downstream/run.py SPEC.yaml --seeds 0 1 --out /tmp/table.md

A spec (YAML) names the seeds, optional pre-training runs made first, the downstream tasks
(a ``configs/finetune`` file plus dotted overrides) and the backbones (dotted overrides that
pick the weights). Every run writes ``result.json`` under ``workdir``; runs whose result exists
are not repeated, so an interrupted experiment resumes where it stopped. See docs/downstream.md.

Fine-tuning tasks (the backbone trains) run through the Lightning task modules as above. A task
whose config freezes the backbone (``model.init_args.linear_probe: true``) is a frozen probe and
is scored by midol eval instead (``experiments/scoring.py``): its data section becomes a suite
task (same sources, classes and carving rule: ``seeded_split`` with the config's fractions and
``split_seed``), every backbone becomes a midol eval backbone spec (``init_checkpoint`` [+
``init_part`` / ``init_prefix`` / ``dex_mode``], ``random:NAME,k=v`` for a random init, or
``timm:NAME@WEIGHTS``), and all backbones are scored together: the linear probe (and, with
``probe: {protocols: knn,linear}``, kNN) with 95 % bootstrap CIs on the test split and paired
verdicts against the random init of each architecture and the spec's ``probe.baseline`` (other
``probe`` keys: ``knn_k``, ``bootstrap``, ``metric``; a task entry may name its ``type``, e.g.
``ordinal``, and ``modality``). The probe is deterministic, so ``seeds`` do not apply to it; its
features are cached in ``workdir/eval_cache`` and its report is in
``workdir/<task>/midol_eval/``. The config's probe-training settings (head, optimiser, epochs)
do not apply either.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import markdown_table, per_seed_table  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments import scoring  # noqa: E402
from midol.config_compose import load_composed  # noqa: E402


# ---------------------------------------------------------------------- config editing
def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    """``cfg["a"]["b"]["c"] = value`` for ``key="a.b.c"`` (creating dicts on the way)."""
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def relocate(cfg: dict[str, Any], new_root: Path) -> dict[str, Any]:
    """Point every output path of a config (strings starting with ``trainer.default_root_dir``:
    logger, checkpoint and export folders) into ``new_root``."""
    old = str(cfg.get("trainer", {}).get("default_root_dir") or "").rstrip("/")
    if not old:
        raise ValueError("the config has no trainer.default_root_dir to relocate")

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str) and (node == old or node.startswith(old + "/")):
            return str(new_root) + node[len(old):]
        return node

    return walk(cfg)


def load_config(path: str | Path, overrides: dict[str, Any], out_dir: Path, seed: int | None) -> dict[str, Any]:
    cfg = load_composed(path)  # presets compose from bases (base:)
    cfg = relocate(cfg, out_dir)
    for key, value in overrides.items():
        set_dotted(cfg, key, value)
    if seed is not None:
        cfg["seed_everything"] = seed
    cfg.pop("weights_only", None)  # a `fit` subcommand option, not part of run=False parsing
    return cfg


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def expand(value: Any, workdir: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{workdir}", str(workdir))
    if isinstance(value, dict):
        return {k: expand(v, workdir) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, workdir) for v in value]
    return value


# ---------------------------------------------------------------------- machine facts
def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU only: {model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------- runs
def fit_and_test(cfg: dict[str, Any], test: bool) -> dict[str, Any]:
    """Instantiate through LightningCLI (the same parser as ``midol fit``), fit, and test the
    checkpoint with the best monitored validation metric."""
    from midol.cli import run_lightning

    argv, sys.argv = sys.argv, sys.argv[:1]  # the config comes from `cfg`, not this script's argv
    try:
        cli = run_lightning(cfg, run=False)
    finally:
        sys.argv = argv
    trainer = cli.trainer
    trainer.fit(cli.model, datamodule=cli.datamodule)
    out: dict[str, Any] = {"global_step": int(trainer.global_step), "epochs": int(trainer.current_epoch)}
    if not test:
        return out
    ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    score = getattr(trainer.checkpoint_callback, "best_model_score", None)
    if ckpt is None:
        raise RuntimeError("no best checkpoint: the config needs a ModelCheckpoint with a monitor")
    results = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, verbose=False)[0]
    out.update(metrics={k: float(v) for k, v in results.items()}, best_checkpoint=ckpt,
               best_val=None if score is None else float(score),
               monitor=getattr(trainer.checkpoint_callback, "monitor", None))
    return out


def run_once(kind: str, cfg: dict[str, Any], result_path: Path, test: bool) -> dict[str, Any]:
    if result_path.is_file():
        return json.loads(result_path.read_text())
    result_path.parent.mkdir(parents=True, exist_ok=True)
    (result_path.parent / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    load_before, start = load_average(), time.time()
    out = fit_and_test(cfg, test)
    out.update(kind=kind, wall_s=round(time.time() - start, 1), load_before=load_before,
               load_after=load_average(), finished=dt.datetime.now().isoformat(timespec="seconds"))
    result_path.write_text(json.dumps(out, indent=2) + "\n")
    return out


def missing_weights(backbone: dict[str, Any]) -> str | None:
    path = backbone.get("model.init_args.init_checkpoint")
    if path and not Path(path).exists():
        return f"weights file not found: {path}"
    return None


# ---------------------------------------------------------------------- frozen probes (midol eval)
def is_frozen_probe(cfg: dict[str, Any]) -> bool:
    """A config whose backbone is frozen (``linear_probe: true``): scored by midol eval."""
    return bool(((cfg.get("model") or {}).get("init_args") or {}).get("linear_probe"))


def suite_task(name: str, cfg: dict[str, Any], entry: dict[str, Any]) -> Any:
    """The config's data section as a midol eval suite task (same sources, classes, fractions
    and split seed: the same carving as the LabelledDataModule)."""
    from midol.evaluation.suite import TaskSpec

    data = cfg.get("data") or {}
    if not str(data.get("class_path", "midol.data.LabelledDataModule")).endswith("LabelledDataModule"):
        raise ValueError(f"task {name!r}: a frozen probe needs a LabelledDataModule, got {data.get('class_path')}")
    d = data.get("init_args") or {}
    num_classes = ((cfg.get("model") or {}).get("init_args") or {}).get("num_classes") or d.get("num_classes")
    kind = entry.get("type") or ("multilabel" if d.get("task") == "multilabel" else
                                 "binary" if num_classes == 2 else "multiclass")
    fractions = {k: float(d.get(k) or 0.0) for k in ("val_fraction", "test_fraction")}
    return TaskSpec(
        name=name, type=kind, modality=entry.get("modality", "unknown"), train=dict(d["train"]),
        val=d.get("val"), test=d.get("test"), split_seed=int(d.get("split_seed", 0)),
        classes=d.get("classes"), image_size=d.get("image_size"),
        uncertain_label=d.get("uncertain_label", "error"), val_fraction=fractions["val_fraction"],
        test_fraction=fractions["test_fraction"],
        split_rule=("the config's splits: " + ", ".join(
            [k for k in ("train", "val", "test") if d.get(k)]
            + [f"{k} {v:g} (split_seed {int(d.get('split_seed', 0))})" for k, v in fractions.items() if v])))


def backbone_spec(cfg: dict[str, Any]) -> str:
    """The midol eval backbone spec of a downstream config's backbone (its model.init_args)."""
    from midol.tasks.backbones import detect_format, part_from_prefix

    init = (cfg.get("model") or {}).get("init_args") or {}
    checkpoint, backbone = init.get("init_checkpoint"), init.get("backbone")
    kwargs = dict(init.get("backbone_kwargs") or {})
    text_kwargs = "".join(f",{k}={json.dumps(v)}" for k, v in kwargs.items())
    if checkpoint is None:
        if not backbone:
            raise ValueError("a random-init backbone needs model.init_args.backbone")
        return f"random:{backbone}{text_kwargs}"
    fmt = init.get("init_format") or "auto"
    fmt = detect_format(checkpoint) if fmt == "auto" else fmt
    if fmt == "timm":
        if not backbone:
            raise ValueError(f"timm weights {checkpoint} need model.init_args.backbone")
        return f"timm:{backbone}{text_kwargs}@{checkpoint}"
    if kwargs:
        raise ValueError(f"{checkpoint}: midol eval builds a checkpoint's backbone as recorded; "
                         f"drop backbone_kwargs {sorted(kwargs)} for a frozen probe")
    if fmt == "exported":
        return str(checkpoint)
    part = init.get("init_part") or part_from_prefix(init.get("init_prefix"))
    dex_mode = init.get("dex_mode")
    if dex_mode is not None:
        if part is not None and part != f"{dex_mode}_backbone":
            raise ValueError(f"init_part {part!r} contradicts dex_mode {dex_mode!r}")
        part = f"{dex_mode}_backbone"
    return f"{checkpoint}:{part}" if part else str(checkpoint)


def probe_section(task: str, entry: dict[str, Any], configs: dict[str, dict[str, Any]], metrics: list[str],
                  probe: dict[str, Any], workdir: Path, skipped: dict[str, str], command: str) -> str:
    """Score every backbone's frozen features on ``task`` with midol eval; its markdown section."""
    from midol.evaluation.suite import Suite

    first = next(iter(configs.values()))
    names = [m.split("/", 1)[-1] for m in metrics]
    primary = probe.get("metric") or ("auc" if "auc" in names else names[0])
    options = scoring.study_options(probe.get("protocols", "linear"), knn_k=probe.get("knn_k", [20]),
                                    bootstrap=int(probe.get("bootstrap", 1000)), metric=primary,
                                    baseline=probe.get("baseline"))
    suite = Suite(f"downstream {task}", [suite_task(task, first, entry)], os.getcwd(),
                  int(first["data"]["init_args"].get("image_size") or 224))
    start = time.time()
    report = scoring.score([(name, backbone_spec(cfg)) for name, cfg in configs.items()],
                           workdir / slug(task) / "midol_eval", suite=suite, options=options,
                           cache_dir=workdir / "eval_cache", command=command)
    seconds = time.time() - start
    digests = {m: scoring.digest(report, m) for m in dict.fromkeys([primary, *names])}
    d = digests[primary]
    settings = list(dict.fromkeys(s["setting"] for s in report["summaries"]))  # run order
    head = ["Backbone"] + [f"{s}: {m.upper()} [95 % CI]" for s in settings for m in digests]
    head += [f"vs random init ({primary.upper()}, {settings[-1]})"]
    if options.baseline:
        head.append(f"vs {options.baseline}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in d["rows"]:
        cells = [row + (" (reference)" if row in d["references"] else "")]
        cells += [scoring.ci_cell(scoring.cell(digests[m], row, task, s)) for s in settings for m in digests]
        cells.append("(reference)" if row in d["references"] else
                     scoring.verdict_cell(scoring.versus(d, row, task, settings[-1])))
        if options.baseline:
            cells.append("(baseline)" if row.split(" [")[0] == options.baseline else
                         scoring.verdict_cell(scoring.versus(d, row, task, settings[-1], "vs_baseline")))
        lines.append("| " + " | ".join(cells) + " |")
    for backbone in skipped:
        lines.append(f"| {backbone} | " + " | ".join("skipped" for _ in head[1:]) + " |")
    text = "\n".join(lines) + "\n"
    if skipped:
        text += "\n" + "\n".join(f"* {b}: skipped, {reason}" for b, reason in skipped.items()) + "\n"
    return (f"## {task}\n\nConfig: `{entry['config']}`"
            + (f" with overrides `{json.dumps(entry.get('overrides', {}))}`" if entry.get("overrides") else "")
            + " (frozen backbone): scored by " + scoring.method_text(options, primary.upper())
            + ". Specs: " + "; ".join(f"{b['label']}: `{b['spec']}`" for b in report["provenance"]["backbones"])
            + f". The probe is deterministic (no seeds); {seconds:.0f} s. Full report: "
            f"`{d['report']}`.\n\n" + text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="experiment spec (YAML)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the spec's seeds")
    parser.add_argument("--out", help="markdown output (default: the spec's `out`)")
    parser.add_argument("--workdir", help="run folder (default: the spec's `workdir`)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="skip (and list in the table) backbones whose weights file is missing")
    ns = parser.parse_args(argv)
    os.chdir(REPO)  # configs name paths relative to the repository root
    spec = yaml.safe_load(Path(ns.spec).read_text())
    workdir = Path(ns.workdir or spec["workdir"])
    seeds = ns.seeds or spec.get("seeds", [0, 1, 2])
    metrics = spec.get("metrics", ["test/acc", "test/auc"])
    common = spec.get("overrides", {})
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(__file__).relative_to(REPO)), *(argv or sys.argv[1:])])
    started, t0 = dt.datetime.now(), time.time()
    print(f"[runner] {spec['name']}: seeds {seeds}, workdir {workdir}, load {load_average()}", flush=True)

    pretrain_info: dict[str, dict[str, Any]] = {}
    for key, entry in (spec.get("pretrain") or {}).items():
        out_dir = workdir / "pretrain" / slug(key)
        cfg = load_config(entry["config"], expand(entry.get("overrides", {}), workdir), out_dir, entry.get("seed"))
        print(f"[runner] pre-training {key} -> {out_dir}", flush=True)
        pretrain_info[key] = run_once("pretrain", cfg, out_dir / "result.json", test=False) | {"config": entry["config"]}

    backbones = {name: expand(b, workdir) for name, b in spec["backbones"].items()}
    skipped: dict[str, str] = {}
    for name, b in list(backbones.items()):
        reason = b.pop("skip_reason", None) or missing_weights(b)
        if reason:
            if not ns.allow_missing and "skip_reason" not in spec["backbones"][name]:
                raise FileNotFoundError(f"backbone {name!r}: {reason} (or pass --allow-missing)")
            skipped[name] = reason
            del backbones[name]

    sections = []
    for task, entry in spec["tasks"].items():
        task_overrides = {**common, **expand(entry.get("overrides", {}), workdir)}
        probe_cfgs = {name: load_config(entry["config"], {**task_overrides, **b}, workdir, None)
                      for name, b in backbones.items()}
        if probe_cfgs and all(is_frozen_probe(c) for c in probe_cfgs.values()):
            print(f"[runner] {task}: frozen probe, scored by midol eval", flush=True)
            sections.append(probe_section(task, entry, probe_cfgs, metrics, spec.get("probe") or {},
                                          workdir, skipped, command))
            continue
        results: dict[str, dict[int, dict[str, float]]] = {}
        runs_info: dict[str, dict[int, dict[str, Any]]] = {}
        runs = []
        for name, backbone in backbones.items():
            results[name], runs_info[name] = {}, {}
            for seed in seeds:
                run_dir = workdir / slug(task) / slug(name) / f"seed{seed}"
                overrides = {**common, **expand(entry.get("overrides", {}), workdir), **backbone}
                cfg = load_config(entry["config"], overrides, run_dir, seed)
                print(f"[runner] {task} | {name} | seed {seed}", flush=True)
                out = run_once("downstream", cfg, run_dir / "result.json", test=True)
                results[name][seed] = out["metrics"]
                runs_info[name][seed] = out
                runs.append(out)
                shown = ", ".join(f"{m}={out['metrics'].get(m, float('nan')):.4f}" for m in metrics)
                print(f"[runner]   {shown} ({out['wall_s']} s, load {out['load_before']})", flush=True)
        wall = sum(r["wall_s"] for r in runs)
        sections.append(
            f"## {task}\n\nConfig: `{entry['config']}`"
            + (f" with overrides `{json.dumps(entry.get('overrides', {}))}`" if entry.get("overrides") else "")
            + f"; {len(seeds)} seeds {seeds}; model selection: best `{runs[0].get('monitor')}` on the "
            "validation split, evaluated once on the test split.\n\n"
            + markdown_table(results, metrics, skipped)
            + f"\nMean ± sample std (ddof = 1) over seeds, in %. Fit + test wall time of the "
            f"{len(runs)} runs: {wall / 60:.1f} min.\n\n<details><summary>Per-seed values</summary>\n\n"
            + per_seed_table(results, metrics, runs_info) + "\n</details>\n"
        )

    lines = [
        f"# Downstream results: {spec['name']}\n",
        spec.get("description", "").strip() + "\n" if spec.get("description") else "",
        f"* Command: `{command}` (spec: `{ns.spec}`)",
        f"* Date: {started.date().isoformat()} (this invocation started {started.isoformat(timespec='seconds')} "
        f"and took {(time.time() - t0) / 60:.1f} min; runs finished by earlier invocations were reused, "
        "each run's own date, wall time and load are in its result.json)",
        f"* Device: {device_description()}; load average (1/5/15 min) at the end: {load_average()}",
        f"* Software: {software_versions()}",
        f"* Common overrides: `{json.dumps(common)}`",
        "* Backbones: " + "; ".join(f"**{n}**: `{json.dumps(b)}`" for n, b in backbones.items()),
    ]
    for key, info in pretrain_info.items():
        lines.append(f"* Pre-training `{key}`: `midol fit --config {info['config']}` (outputs relocated to "
                     f"`{workdir}/pretrain/{slug(key)}`), {info['global_step']} steps, {info['wall_s']} s, "
                     f"load {info['load_before']} before")
    if spec.get("notes"):
        lines.append("\n" + spec["notes"].strip())
    text = "\n".join(lines) + "\n\n" + "\n".join(sections)
    out_path = Path(ns.out or spec["out"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(f"[runner] wrote {out_path}", flush=True)
    return 0


def software_versions() -> str:
    import lightning
    import timm
    import torch

    import midol

    return (f"midol {midol.__version__}, torch {torch.__version__}, lightning {lightning.__version__}, "
            f"timm {timm.__version__}, python {platform.python_version()}")


if __name__ == "__main__":
    sys.exit(main())
