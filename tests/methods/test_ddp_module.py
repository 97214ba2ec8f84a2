"""PretrainModule under data parallelism: two gloo processes, each with half of a fixed batch of
real images, give the same student gradients (averaged over ranks, as DDP does) as one process
with the whole batch — for both L_cst variants (the routing loss, Sinkhorn, InfoNCE and the
DINO centre all take part). The loss-level checks are in test_losses_distributed.py.
"""

from __future__ import annotations

import datetime
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from midol.data.image_io import load_image  # noqa: E402
from midol.data.pretrain_datasets import ViewCollate  # noqa: E402
from midol.data.transforms import MultiCropTransform  # noqa: E402
from tests.helpers.tiny import TINY_SWIN, tiny_module  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORLD = 2
BATCH = 8  # 4 images per rank
VARIANTS = ("infonce", "dino_ce")


def make_module(cst_loss: str):
    # No stochastic depth: it would draw different random numbers in one and two processes.
    return tiny_module(
        cst_loss=cst_loss, num_global_views=2, backbone_kwargs={**TINY_SWIN, "drop_path_rate": 0.0},
    )


def make_batch(sample_data: Path) -> dict:
    """8 real images (X-ray, pathology, OCT), 2 global 32 px + 2 local 16 px views each."""
    files = (
        sorted((sample_data / "xray").rglob("*.png"))[:3]
        + sorted((sample_data / "pathology").rglob("*.*g"))[:3]
        + sorted((sample_data / "oct").rglob("*.png"))[:2]
    )
    assert len(files) == BATCH
    transform = MultiCropTransform(global_size=32, local_size=16, num_global=2, num_local=2, seed=0)
    items = [
        {"views": transform(load_image(f)), "modality": 0, "index": i, "skipped": []}
        for i, f in enumerate(files)
    ]
    return ViewCollate(num_global=2)(items)


def rows(batch: dict, rank: int) -> dict:
    part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return {"views": [v[part] for v in batch["views"]], "skipped": []}


def step(module, batch: dict) -> dict[str, torch.Tensor]:
    """One training_step + backward; the student gradients, the loss and the DINO centre."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        out = module.training_step(batch, 0)
    out["loss"].backward()
    module.on_after_backward()  # as Lightning does: commits the step's DINO centre update
    res = {f"grad.{n}": p.grad.detach().clone() for n, p in module.student.named_parameters()}
    res["loss"] = out["loss"].detach()
    if module.dino_loss is not None:
        res["center"] = module.dino_loss.center.detach().clone()
    return res


def worker(rank: int, world: int, init_file: str, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        batch = torch.load(Path(tmp) / "batch.pt", weights_only=False)
        for cst in VARIANTS:
            module = make_module(cst)
            module.load_state_dict(torch.load(Path(tmp) / f"init_{cst}.pt"))
            res = step(module, rows(batch, rank))
            for key, value in res.items():
                if key.startswith("grad."):
                    dist.all_reduce(value)  # DDP: mean of the ranks' gradients
                    value /= world
            torch.save(res, Path(tmp) / f"rank{rank}_{cst}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> dict:
    assert not (dist.is_available() and dist.is_initialized())
    tmp = tmp_path_factory.mktemp("ddp_module")
    batch = make_batch(sample_data)
    torch.save(batch, tmp / "batch.pt")
    whole, half = {}, {}
    for cst in VARIANTS:
        torch.manual_seed(0)
        module = make_module(cst)
        torch.save(module.state_dict(), tmp / f"init_{cst}.pt")
        whole[cst] = step(module, batch)
        module = make_module(cst)
        module.load_state_dict(torch.load(tmp / f"init_{cst}.pt"))
        half[cst] = step(module, rows(batch, 0))  # one process on rank 0's half alone
    mp.spawn(worker, args=(WORLD, str(tmp / "pg_init"), str(tmp)), nprocs=WORLD, join=True)
    ranks = {
        cst: [torch.load(tmp / f"rank{r}_{cst}.pt") for r in range(WORLD)] for cst in VARIANTS
    }
    return {"whole": whole, "half": half, "ranks": ranks}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cst_loss", VARIANTS)
def test_ddp_student_gradients_equal_whole_batch(runs: dict, cst_loss: str) -> None:
    whole, half, ranks = runs["whole"][cst_loss], runs["half"][cst_loss], runs["ranks"][cst_loss]
    grads = [k for k in whole if k.startswith("grad.")]
    assert grads, "no student gradient"
    scale = max(float(whole[k].abs().max()) for k in grads)
    assert scale > 0
    moved = 0
    for key in grads:
        for res in ranks:  # after the all-reduce every rank holds the same averaged gradient
            assert_close(res[key], whole[key], rtol=1e-4, atol=2e-5 * scale, msg=key)
        moved += int(not torch.allclose(half[key], whole[key], rtol=1e-3, atol=1e-4 * scale))
    # The collectives matter: one process on half the batch gets other gradients.
    assert moved > len(grads) // 4
    # Per-rank losses average to the whole-batch loss (what DDP's gradient mean implies).
    mean_loss = sum(res["loss"] for res in ranks) / WORLD
    assert_close(mean_loss, whole["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
def test_ddp_dino_centre_equals_whole_batch(runs: dict) -> None:
    whole, half = runs["whole"]["dino_ce"], runs["half"]["dino_ce"]
    for res in runs["ranks"]["dino_ce"]:
        assert_close(res["center"], whole["center"], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(half["center"], whole["center"], atol=1e-6)
