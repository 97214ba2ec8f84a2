"""Downstream backbones from (a) a midol checkpoint, (b) an exported safetensors, (c) timm."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from midol.methods import PretrainModule
from midol.methods.export import export_checkpoint
from midol.tasks import ClassificationModule
from midol.tasks.backbones import detect_format, load_backbone
from tests.helpers.finetune import SWIN, pretrain_checkpoint, tiny_backbone_args
from tests.helpers.images import real_batch
from tests.helpers.tiny import TINY_SWIN


@pytest.fixture()
def ckpt(tmp_path_factory):
    return pretrain_checkpoint(tmp_path_factory)


def teacher_features(ckpt, images):
    module = PretrainModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    return module.teacher_features(images)


def test_midol_checkpoint_and_export_give_the_teachers_features(ckpt, tmp_path):
    images = real_batch(32)
    expected = teacher_features(ckpt, images)
    (exported,) = export_checkpoint(ckpt, tmp_path)
    assert detect_format(ckpt) == "midol" and detect_format(exported) == "exported"
    for source in (ckpt, exported):
        module = ClassificationModule(num_classes=2, init_checkpoint=str(source)).eval()
        assert module.backbone_info.model == SWIN
        assert module.backbone_info.overrides["embed_dim"] == TINY_SWIN["embed_dim"]
        torch.testing.assert_close(module.features(images), expected, rtol=1e-4, atol=1e-5)


def test_student_part_differs_from_teacher(ckpt):
    teacher, _ = load_backbone(checkpoint=ckpt)
    student, _ = load_backbone(checkpoint=ckpt, part="student_backbone")
    diffs = [not torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), student.state_dict().values())]
    assert any(diffs)


def test_timm_random_init_and_local_weights(tmp_path):
    random_a, info = load_backbone(**tiny_backbone_args())
    assert info.source == "random init"
    weights = tmp_path / "weights.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in random_a.state_dict().items()}, str(weights))
    torch.manual_seed(123)
    loaded, info = load_backbone(**tiny_backbone_args(checkpoint=str(weights)))
    assert info.source.startswith("timm weights")
    x = real_batch(32).float() / 255
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), random_a.eval()(x))


def test_extra_kwargs_are_added_and_conflicts_are_clear_errors(ckpt, tmp_path):
    model, info = load_backbone(checkpoint=ckpt, backbone_kwargs={"drop_path_rate": 0.1})
    assert info.overrides["drop_path_rate"] == 0.1 and info.overrides["embed_dim"] == TINY_SWIN["embed_dim"]
    with pytest.raises(ValueError, match="leave backbone unset"):
        load_backbone(backbone="resnet18", checkpoint=ckpt)
    with pytest.raises(ValueError, match="do not fit the backbone"):
        load_backbone(checkpoint=ckpt, backbone_kwargs={"embed_dim": 24})
    with pytest.raises(ValueError, match="no backbone part 'nothing'.*teacher_backbone"):
        load_backbone(checkpoint=ckpt, part="nothing")
    with pytest.raises(ValueError, match="name the timm model"):
        load_backbone()
    with pytest.raises(FileNotFoundError):
        load_backbone(checkpoint=tmp_path / "missing.ckpt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="not a midol training checkpoint"):
        load_backbone(checkpoint=tmp_path / "plain.ckpt")



def test_other_input_sizes_use_correct_swin_masks():
    """At a size other than img_size the shifted-window masks must be recomputed: features equal
    timm's own dynamic-size Swin and do not depend on the batch an image sits in."""
    import timm

    kwargs = dict(img_size=32, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=2)
    backbone, _ = load_backbone(SWIN, kwargs)  # 2 blocks per stage: the second uses shifted windows
    backbone.eval()
    reference = timm.create_model(SWIN, num_classes=0, strict_img_size=False, **kwargs).eval()
    reference.load_state_dict(backbone.state_dict())
    x = (real_batch(48).float() / 255 - 0.45) / 0.225  # pre-trained at 32 px, used at 48 px
    with torch.no_grad():
        batched = backbone(x)
        one_by_one = torch.cat([backbone(x[i : i + 1]) for i in range(len(x))])
        torch.testing.assert_close(batched, reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-5)
