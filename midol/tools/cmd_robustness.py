"""``midol robustness CKPT [CKPT ...] --out DIR``: score trained fusion models under MedMIX's
missing-input protocols (test-time drop-rate sweep, each input removed, not-at-random drop,
naturally incomplete patients) on the same patients and masks; writes a table (Markdown, CSV,
JSON) and a PNG curve of macro AUC vs drop rate, one line per model.

The patient data are rebuilt from each checkpoint's datamodule settings (or ``--data``, a
fusion config whose ``data`` section is used), and the cached expert features are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from midol.analysis.plotting import set_output
from midol.analysis.robustness import Protocols, evaluate, write_report
from midol.io.atomic import atomic_write_text
from midol.tools.options import add_figure_options, add_trust_option


def load_fusion(checkpoint: str, data_config: str | None = None, trusted: tuple[str, ...] = ()) -> Any:
    """A trained MedMIX method attached to its patient data (features from the cache)."""
    from midol.data.patient_datamodule import PatientDataModule
    from midol.io.weights import load_state_dict_file
    from midol.methods.loading import load_method

    method = load_method(checkpoint, trusted_class_paths=trusted)
    if not hasattr(method, "attach"):
        raise ValueError(f"{checkpoint}: trained with {type(method).__name__}, not a fusion model")
    if data_config:
        import yaml

        with open(data_config, encoding="utf-8") as fh:
            config = yaml.safe_load(fh) or {}
        data = (config.get("data") or {}).get("init_args")
        if not data:
            raise ValueError(f"{data_config}: no data.init_args section")
    else:
        data = load_state_dict_file(checkpoint).get("datamodule_hyper_parameters")
        if not data:
            raise ValueError(f"{checkpoint}: no datamodule settings saved; pass --data CONFIG")
    datamodule = PatientDataModule(**{k: v for k, v in dict(data).items() if not k.startswith("_")})
    datamodule.setup("test")
    method.attach(datamodule, fit=False)
    return method


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="midol robustness", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="trained fusion checkpoints (.ckpt)")
    parser.add_argument("--names", nargs="+", default=None, help="one label per checkpoint (default: file stems)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--data", default=None, help="fusion config whose data section to use")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="patients to score")
    parser.add_argument("--rates", nargs="+", type=float, default=None, help="drop rates of the sweep")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="mask seeds")
    parser.add_argument("--negative-labels", nargs="*", default=["N"],
                        help="labels/classes that do not make a patient positive (not-at-random)")
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="patient resamples of the not-at-random check's 95%% CI (0: no check)")
    parser.add_argument("--cost", action="store_true",
                        help="also measure parameters and patients/s with and without the teacher path")
    add_trust_option(parser)
    add_figure_options(parser)
    ns = parser.parse_args(argv)
    set_output(ns.format, ns.dpi)
    names = ns.names or [Path(c).stem for c in ns.checkpoints]
    if len(names) != len(ns.checkpoints):
        parser.error(f"--names has {len(names)} labels for {len(ns.checkpoints)} checkpoints")
    if ns.bootstrap < 0:
        parser.error(f"--bootstrap must be >= 0, got {ns.bootstrap}")
    protocols = Protocols(seeds=tuple(ns.seeds), negative_labels=tuple(ns.negative_labels),
                          bootstrap=ns.bootstrap)
    if ns.rates:
        protocols.rates = tuple(ns.rates)
    scores, costs = [], {}
    for name, ckpt in zip(names, ns.checkpoints, strict=True):
        method = load_fusion(ckpt, ns.data, tuple(ns.class_path))  # errors: midol's one-line report
        scores += evaluate(method, name, method.table.rows(ns.split), protocols)
        if ns.cost:
            from midol.fusion.export import inference_cost

            costs[name] = inference_cost(method)
    header = f"Patients: the {ns.split} split. Checkpoints: " + ", ".join(
        f"{n} = `{c}`" for n, c in zip(names, ns.checkpoints, strict=True))
    paths = write_report(scores, ns.out, header=header)
    if costs:
        atomic_write_text(Path(ns.out) / "cost.json", json.dumps(costs, indent=1) + "\n")
    for s in scores:
        if s.reads_missingness and s.gain is not None and s.gain_ci is not None:
            print(f"midol robustness: warning: {s.model}: macro AUC rises by {s.gain:+.4f} (95% CI "
                  f"[{s.gain_ci[0]:+.4f}, {s.gain_ci[1]:+.4f}]) when {s.setting} goes missing "
                  "mostly for positive patients: the model reads the label from missingness "
                  "(see robustness.md)", file=sys.stderr)
    for path in paths.values():
        print(f"wrote {path}")
    return 0
