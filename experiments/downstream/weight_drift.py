"""How far pre-training moved the backbones: relative L2 distance of the teacher and student
backbone weights of midol checkpoints from the seeded initialisation they started from.

    python experiments/downstream/weight_drift.py CKPT [CKPT ...] [--seed 0]

The initialisation is rebuilt by seeding like ``midol fit`` (``seed_everything``) and building the
backbone first, as ``PretrainModule`` does; the script checks the rebuilt weights are that start by
reporting the distance (a tiny teacher distance after few EMA steps means they are).
"""

from __future__ import annotations

import argparse
import sys

import lightning as L
import torch

from midol.models import build_backbone
from midol.tasks.backbones import read_pretrain_checkpoint


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten().double() for k, v in sorted(state.items()) if v.is_floating_point()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything of the pre-training run")
    ns = parser.parse_args(argv)
    teachers = {}
    print("| checkpoint | ‖teacher − init‖ / ‖init‖ | ‖student − init‖ / ‖init‖ |\n|---|---|---|")
    for path in ns.checkpoints:
        teacher, hparams = read_pretrain_checkpoint(path)
        student, _ = read_pretrain_checkpoint(path, "student.backbone.")
        L.seed_everything(ns.seed, verbose=False)
        init = flat(build_backbone(hparams["backbone"], hparams.get("backbone_kwargs")).state_dict())
        t, s = flat(teacher), flat(student)
        teachers[path] = t
        print(f"| {path} | {float((t - init).norm() / init.norm()):.4%} | {float((s - init).norm() / init.norm()):.4%} |")
    paths = list(teachers)
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            print(f"\n‖teacher({a}) − teacher({b})‖ / ‖teacher({a})‖ = "
                  f"{float((teachers[a] - teachers[b]).norm() / teachers[a].norm()):.4%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
