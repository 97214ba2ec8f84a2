"""The LightningCLI part of the ``midol`` command (``midol fit | validate | test``): run folders,
resume checks, output folders. :mod:`midol.cli` imports it only when such a subcommand runs, so
``midol --version``, ``midol --help`` and the tools' ``--help`` do not load torch or Lightning.

    midol fit --config configs/pretrain/demo.yaml [--model.init_args.num_experts 8 ...]
    midol fit --config configs/pretrain/demo.yaml --print_config
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from midol.commands import TOOLS
from midol.config_compose import expand_bases
from midol.config_errors import short_parse_error
from midol.errors import EXIT_USAGE, UsageError, debug_active
from midol.io.checkpoint_io import last_checkpoint, resolve_resume
from midol.run_guard import (
    OUTPUT_KEYS,
    RunFolderLock,
    check_outputs_writable,
    checkpoint_dirs,
    format_differences,
    hparam_differences,
    refuse_foreign_resume,
    refuse_overwrite,
    run_folder,
    set_aside_checkpoints,
)


class MidolArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors are one ``midol: error: ...`` line with the closest
    valid key (:func:`midol.config_errors.short_parse_error`), exit status 2, instead of the
    usage dump and jsonargparse's nested message (printed after the line with ``--debug``)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a nested parser whose caller handles the error
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        subcommand = re.match(r"Subcommand '([^']+)'", message)
        subparsers = getattr(getattr(self, "_subcommands_action", None), "_name_parser_map", {})
        if subcommand and subcommand.group(1) in subparsers:
            parser = subparsers[subcommand.group(1)]
        line = short_parse_error(message, parser, subcommands=list(subparsers), tools=TOOLS)
        sys.stderr.write(f"midol: error: {line}\n")
        if debug_active():
            sys.stderr.write(f"jsonargparse's message:\n{message}\n")
        sys.stderr.flush()
        sys.exit(EXIT_USAGE)


class MidolCLI(LightningCLI):
    """LightningCLI in subclass mode: configs pick module and datamodule by ``class_path``,
    so users can select or add their own classes without touching midol.

    ``--ckpt_path`` checkpoints are read with ``weights_only=True`` by default (no pickled code
    runs); pass ``--weights_only false`` only for a checkpoint you trust.

    Run safety (docs/troubleshooting.md, "Run folders, overwrites and checkpoint safety"):
    checkpoints are written atomically (:class:`midol.io.checkpoint_io.AtomicCheckpointIO`);
    ``midol fit`` refuses a run folder that already holds checkpoints unless ``--ckpt_path`` (a
    checkpoint of that folder) or ``--overwrite true`` is given, checks before training that
    every output folder can be written, and locks the run folder for the whole fit (a second
    fit into it is refused); a resume keeps the config's settings (naming those that differ
    from the checkpoint's) and falls back to the newest readable checkpoint when the one named
    is damaged.
    """

    def __init__(self, *args: Any, config_root: str | None = None, **kwargs: Any) -> None:
        self._config_root = config_root  # trainer.default_root_dir of the --config files
        self._outputs_filled = False
        self._resume: dict[str, Any] | None = None
        self._lock: RunFolderLock | None = None
        try:
            super().__init__(*args, **kwargs)
        finally:  # also after an error: a later fit in this process may use the folder
            if self._lock is not None:
                self._lock.release()

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test. Lightning's ``predict`` is left out: its loop needs the
        training config and writes no file; ``midol predict`` (a tool, midol/tools/
        cmd_predict.py) writes a CSV of class probabilities from a fine-tuned checkpoint."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            parser.set_defaults(weights_only=True)
        return parser

    def add_arguments_to_parser(self, parser: Any) -> None:
        # SUPPRESS: absent from --print_config and the saved config unless given.
        parser.add_argument(
            "--overwrite", type=bool, default=argparse.SUPPRESS,
            help="Start a new run in a run folder whose checkpoint folder already holds *.ckpt "
                 "files, or resume another folder's checkpoint there (without it, midol fit "
                 "refuses both; --ckpt_path of that folder resumes it; default: false)")
        parser.add_argument(
            "--run_id", type=str, default=argparse.SUPPRESS,
            help="Give this run its own folder: every output moves to <default_root_dir>/<run_id>. "
                 "'auto': the W&B run id when a W&B agent launched the run (WANDB_RUN_ID), else "
                 "the start time (YYYYmmdd-HHMMSS); resume that run with the same --run_id and "
                 "--ckpt_path last")
        parser.add_argument(
            "--threads", type=int, default=argparse.SUPPRESS,
            help="Intra-op CPU threads of torch (default: torch's, one per core). On a shared or "
                 "busy machine, threads plus data workers above the free cores slow every step "
                 "several-fold: try --threads 1")
        parser.add_argument(
            "--test_after_fit", type=bool, default=argparse.SUPPRESS,
            help="After fit, test the best checkpoint (the monitored one; else the last weights) "
                 "on the datamodule's test split, so a sweep run ends with test/* metrics "
                 "(default: false)")

    def after_fit(self) -> None:
        """``--test_after_fit true``: ``trainer.test`` on the best checkpoint."""
        if not (self._subcommand_config() or {}).get("test_after_fit", False):
            return
        datamodule = self.datamodule
        if datamodule is None or not callable(getattr(datamodule, "test_dataloader", None)):
            raise UsageError("--test_after_fit needs a datamodule with a test split")
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or None
        self.trainer.test(self.model, datamodule=datamodule, ckpt_path=best, weights_only=True)

    def _subcommand_config(self) -> Any:
        sub = self.config.get("subcommand")
        return self.config.get(sub) if sub else self.config

    def _fill_outputs_once(self) -> None:
        config = self._subcommand_config()
        if config is not None and not self._outputs_filled:
            trainer = config.get("trainer")
            run_id = config.get("run_id")
            if run_id and trainer is not None:
                base = trainer.get("default_root_dir") or "outputs"
                if self._config_root is None:
                    self._config_root = str(base)
                resume_last = config.get("ckpt_path") == "last"
                trainer["default_root_dir"] = os.path.join(
                    str(base), resolve_run_id(str(run_id), str(base) if resume_last else None))
            fill_output_dirs(trainer, self._config_root)
            self._outputs_filled = True

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, which loaded a ``--ckpt_path`` file's hyper-parameters into
        the config (overriding the command line, and importing the ``_class_path`` the file
        names) but ignored them for ``--ckpt_path last``. Here, for a file and for ``last``
        alike: the config wins, each differing setting is named in a warning, a checkpoint's
        class outside midol is refused, and (fit) a damaged file falls back to the newest
        readable checkpoint of its folder."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        config = self.config[sub]
        self._fill_outputs_once()
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or ckpt_path in ("best", "hpc") or "://" in str(ckpt_path) \
                or str(ckpt_path).startswith("registry:"):
            return
        if ckpt_path == "last":
            trainer = config.get("trainer")
            found = last_checkpoint(checkpoint_dirs(trainer), trainer.get("default_root_dir") if trainer else None)
            if found is None:
                return  # Lightning warns and starts from scratch (a first run of a requeued job)
            ckpt_path = found
        elif not Path(ckpt_path).exists():
            return  # Lightning reports the missing file
        path, ckpt = resolve_resume(ckpt_path, config.get("weights_only", True), fallback=sub == "fit")
        config["ckpt_path"] = str(path)
        self._resume = {"path": path, "differences": self._check_checkpoint_settings(path, ckpt, config)}

    def _check_checkpoint_settings(self, path: Path, ckpt: dict[str, Any], config: Any) -> list:
        hparams = dict(ckpt.get("hyper_parameters") or {})
        model = self.parser.dump(self.config, skip_link_targets=False, skip_none=False, format="yaml")
        model = (yaml.safe_load(model).get(self.config["subcommand"]) or {}).get("model") or {}
        wanted = model.get("class_path")
        saved = hparams.get("_class_path")
        if saved and wanted and saved != wanted:
            if not saved.startswith("midol."):
                raise UsageError(
                    f"{path}: its hyper-parameters name the module class {saved!r}, outside midol, "
                    f"and the config's is {wanted!r}; midol does not import a class a checkpoint "
                    "chooses: set model.class_path to it in the config if you trust that code")
            rank_zero_warn(f"{path} was trained with {saved}; the config's {wanted} is used")
            return []
        init_args = {**(model.get("init_args") or {}), **(model.get("dict_kwargs") or {})}
        differences = hparam_differences(hparams, init_args)
        if differences:
            rank_zero_warn(
                f"{path}: the config sets {len(differences)} setting(s) that differ from the "
                f"checkpoint's hyper-parameters; the config's values are used: "
                f"{format_differences(differences)}")
        return differences

    def before_instantiate_classes(self) -> None:
        """Fill output folders from ``trainer.default_root_dir`` (:func:`fill_output_dirs`);
        for ``fit``: refuse to overwrite a previous run's checkpoints, and check that every
        output folder can be written, before anything is built or trained."""
        config = self._subcommand_config()
        if config is None:
            return
        self._fill_outputs_once()
        apply_threads(config.get("threads"))
        check_accelerator(config.get("trainer"))
        if self.subcommand != "fit":
            return
        trainer = config.get("trainer")
        ckpt_path = config.get("ckpt_path")
        if not config.get("overwrite", False):
            if not ckpt_path:
                refuse_overwrite(trainer)
            elif ckpt_path not in ("last", "hpc", "best"):  # those name this run's own files
                refuse_foreign_resume(trainer, str(ckpt_path))
        elif ckpt_path not in ("last", "hpc", "best"):
            for folder in set_aside_checkpoints(trainer, str(ckpt_path) if ckpt_path else None):
                rank_zero_info(f"--overwrite true: the previous run's checkpoints moved to {folder}")
        check_outputs_writable(trainer)
        self._lock = RunFolderLock(run_folder(trainer))
        self._lock.acquire()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with :class:`AtomicCheckpointIO` unless a CheckpointIO plugin is given."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        plugins = kwargs.get("plugins", trainer_config.get("plugins"))
        kwargs["plugins"] = with_atomic_checkpoint_io(plugins)
        return super().instantiate_trainer(**kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as err:
            if self._resume is None or "Error(s) in loading state_dict" not in str(err):
                raise
            raise UsageError(weights_mismatch_message(self._resume, err)) from err


def latest_run(root: str) -> str | None:
    """The run folder under ``root`` whose checkpoints were written last (None: none has one)."""
    newest: tuple[float, str] | None = None
    if not os.path.isdir(root):
        return None
    for entry in os.scandir(root):
        folder = os.path.join(entry.path, "checkpoints")
        if not entry.is_dir() or not os.path.isdir(folder):
            continue
        for ckpt in os.scandir(folder):
            if ckpt.name.endswith(".ckpt") and ckpt.is_file():
                stamp = ckpt.stat().st_mtime
                if newest is None or stamp > newest[0]:
                    newest = (stamp, entry.name)
    return newest[1] if newest else None


def resolve_run_id(run_id: str, resume_under: str | None = None) -> str:
    """``auto`` -> ``$WANDB_RUN_ID`` or the local start time; else the id itself (one folder
    name: no ``/``, not empty). With ``resume_under`` (``--ckpt_path last``), ``auto`` without
    ``WANDB_RUN_ID`` is the run under that root whose checkpoints are newest: a requeued job
    resumes its run instead of starting a new one in a new folder."""
    where = "--run_id"
    if run_id == "auto":
        import time

        where = "--run_id auto (from WANDB_RUN_ID)"  # the environment must not escape the root
        if os.environ.get("WANDB_RUN_ID"):
            run_id = os.environ["WANDB_RUN_ID"]
        elif resume_under is not None:
            found = latest_run(resume_under)
            if found is None:
                raise UsageError(f"--run_id auto --ckpt_path last: no run under {resume_under} has a "
                                 "checkpoint to resume; leave out --ckpt_path last to start one")
            rank_zero_info(f"--run_id auto --ckpt_path last: resuming run {found} (newest checkpoints "
                           f"under {resume_under})")
            return found
        else:
            run_id = time.strftime("%Y%m%d-%H%M%S")
    if not run_id.strip() or "/" in run_id or "\\" in run_id or run_id in (".", ".."):
        raise UsageError(f"{where} must be one folder name (no '/'), got {run_id!r}")
    return run_id


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given; otherwise a warning when the machine is
    already busy (load average above the cores this process may use), the case where torch's
    default of one thread per core oversubscribes them."""
    import torch

    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        return
    try:
        cores = len(os.sched_getaffinity(0))
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not Linux / no load average
        return
    if load > cores + 0.5:
        rank_zero_warn(
            f"the machine is busy (load average {load:.1f} on {cores} usable cores): torch's "
            f"{torch.get_num_threads()} threads plus the data workers will compete for them and "
            "run several times slower; pass --threads 1 (or fewer data workers) on a shared machine")


class LoggedSaveConfig(SaveConfigCallback):
    """Lightning's ``config.yaml`` in the log folder, and the whole resolved config (model,
    data, trainer, seed) in the hyper-parameters of W&B loggers: a sweep then filters and
    groups runs by any setting, not only the module's."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False)) or {}
        for logger in loggers:
            logger.log_hyperparams({"config": config})


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """``plugins`` plus an :class:`AtomicCheckpointIO`, unless one of them is a CheckpointIO."""
    from lightning.fabric.plugins import CheckpointIO

    from midol.io.checkpoint_io import AtomicCheckpointIO

    listed = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in listed):
        listed.append(AtomicCheckpointIO())
    return listed


def weights_mismatch_message(resume: dict[str, Any], err: BaseException) -> str:
    """One line for a resume whose weights do not fit the module the config builds."""
    detail = next((line.strip().rstrip(".") for line in str(err).splitlines()
                   if "size mismatch" in line or "Missing key" in line or "Unexpected key" in line),
                  str(err).splitlines()[0])
    if resume["differences"]:
        cause = (f"settings that differ from the checkpoint's hyper-parameters: "
                 f"{format_differences(resume['differences'])}; a resume cannot change a setting "
                 "that shapes the weights: use the checkpoint's value or start a new run")
    else:
        cause = "no setting of the config differs from the checkpoint's hyper-parameters"
    return (f"{resume['path']}: its weights do not fit the module the config builds "
            f"({detail[:200]}); {cause}")


def fill_output_dirs(trainer: Any, config_root: str | None = None) -> None:
    """Output folders of a parsed ``trainer`` config, from ``trainer.default_root_dir``:

    * a null ``dirpath`` of a ModelCheckpoint becomes ``<default_root_dir>/checkpoints``
      (Lightning's own default nests it under the logger); null export / summary folders are
      the root already (those callbacks default to it);
    * when the root differs from ``config_root`` (the ``--config`` files' root, overridden by
      ``--trainer.default_root_dir`` on the command line), every logger ``save_dir`` and callback
      ``dirpath`` / ``output_dir`` / ``image_dir`` under ``config_root`` moves under the new
      root: one option moves all of a preset's outputs.
    """
    if trainer is None or not trainer.get("default_root_dir"):
        return
    root = str(trainer["default_root_dir"])
    old = os.path.normpath(config_root) if config_root else None

    def moved(value: Any) -> Any:
        if old is None or value is None or old == os.path.normpath(root) or "://" in str(value):
            return value
        path = os.path.normpath(str(value))
        if path == old:
            return root
        if path.startswith(old.rstrip(os.sep) + os.sep):
            return os.path.join(root, os.path.relpath(path, old))
        return value

    loggers = trainer.get("logger")
    for spec in (loggers if isinstance(loggers, list) else [loggers]):
        args = getattr(spec, "init_args", None)
        if args is not None and args.get("save_dir") is not None:
            args["save_dir"] = moved(args["save_dir"])
    for cb in trainer.get("callbacks") or []:
        args = getattr(cb, "init_args", None)
        if args is None:
            continue
        for key in OUTPUT_KEYS:
            if key in args and args.get(key) is not None:
                args[key] = moved(args[key])
        if "ModelCheckpoint" in str(getattr(cb, "class_path", "")) and args.get("dirpath") is None:
            args["dirpath"] = f"{root}/checkpoints"


def config_files_root(args: list[str]) -> str | None:
    """``trainer.default_root_dir`` as the first ``--config`` file (or composed YAML text) of
    ``args`` that sets it has it (the preset's own root, which a later config file or the
    command line may change); None when none sets it."""
    root = None
    for i, token in enumerate(args):
        if token in ("--config", "-c") and i + 1 < len(args):
            value = args[i + 1]
        elif token.startswith("--config="):
            value = token.split("=", 1)[1]
        else:
            continue
        try:
            text = Path(value).read_text(encoding="utf-8") if Path(value).is_file() else value
            data = yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError):
            continue  # LightningCLI reports it
        trainer = data.get("trainer") if isinstance(data, dict) else None
        if isinstance(trainer, dict) and trainer.get("default_root_dir"):
            return str(trainer["default_root_dir"])
    return root


def check_accelerator(trainer: Any) -> None:
    """One line, before anything is built, when a preset asks for a GPU this machine lacks (the
    paper presets: ``accelerator: gpu``, bf16); Lightning's own error came as a traceback."""
    if trainer is None:
        return
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    if torch.cuda.is_available():
        return
    precision = trainer.get("precision")
    raise UsageError(
        f"trainer.accelerator is {accelerator} (devices: {trainer.get('devices')}, precision: "
        f"{precision}) but no CUDA GPU is visible: on this machine add --trainer.accelerator cpu "
        "--trainer.devices 1 --trainer.precision 32-true (and a smaller "
        "--data.init_args.batch_size; expect hours per epoch for a Swin-B)")


def with_run_config(tokens: list[str]) -> list[str]:
    """``midol test|validate --ckpt_path CKPT`` without ``--config``: the config the run that
    wrote CKPT saved (its log folder's ``config.yaml``), so the test uses the run's image size,
    data and model settings, not a preset's (issue 27 item 5). With ``--config`` the given
    config is used, as told."""
    if not tokens or tokens[0] not in ("test", "validate"):
        return tokens
    rest = tokens[1:]
    if any(t in ("--config", "-c") or t.startswith("--config=") for t in rest):
        return tokens
    ckpt = next((rest[i + 1] for i, t in enumerate(rest[:-1]) if t == "--ckpt_path"),
                next((t.split("=", 1)[1] for t in rest if t.startswith("--ckpt_path=")), None))
    if ckpt is None or ckpt in ("last", "best", "hpc"):
        return tokens
    config = run_config_of(ckpt)
    if config is None:
        raise UsageError(f"{ckpt}: the checkpoint records no run folder with a config.yaml; pass "
                         "--config (the preset it was trained with, with the same overrides)")
    rank_zero_info(f"{tokens[0]}: using the config of the run that wrote {ckpt}: {config}")
    return [tokens[0], "--config", config, *rest]


def run_config_of(ckpt: str) -> str | None:
    """The ``config.yaml`` of the newest log folder a checkpoint records (None: none found)."""
    from midol.methods.loading import read_checkpoint
    from midol.utils.run_logs import recorded_log_dirs

    try:
        checkpoint = read_checkpoint(ckpt)
    except (OSError, ValueError) as err:
        raise UsageError(f"--ckpt_path {ckpt}: {err}") from err
    for folder in reversed(recorded_log_dirs(checkpoint)):
        path = os.path.join(folder, "config.yaml")
        if os.path.isfile(path):
            return path
    return None


def run_lightning(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> MidolCLI:
    """``args=None`` reads ``sys.argv``; tests pass a list or a parsed config dict (and
    ``run=False`` to only build). ``--config`` presets with ``base:`` are composed first."""
    if isinstance(args, dict):
        tokens: list[str] | dict[str, Any] = args
        root = ((args.get("trainer") or {}).get("default_root_dir")
                if isinstance(args.get("trainer"), dict) else None)
    else:
        tokens = expand_bases(with_run_config(sys.argv[1:] if args is None else args))
        root = config_files_root(tokens)
    return MidolCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=MidolArgumentParser,
        save_config_callback=LoggedSaveConfig,
        # midol's modules build their own optimiser groups (no decay on norms and biases, layer
        # decay) and set the lr every step from their schedule: LightningCLI's --optimizer /
        # --lr_scheduler would silently replace the groups and be overwritten by the schedule
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=tokens,
        run=run,
        parser_kwargs={"description": "midol: medical image foundation models on Lightning. "
                       f"Other subcommands: {', '.join(sorted(TOOLS))} (midol <tool> --help). "
                       "midol --version prints the versions; --debug (or MIDOL_DEBUG=1) shows "
                       "the traceback behind an error message."},
        config_root=root,
    )
