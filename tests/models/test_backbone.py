"""Backbone factory: Swin-B size, tiny overrides, local init checkpoints, grad checkpointing."""

import pytest
import torch
from safetensors.torch import save_file

from midol.models import build_backbone, load_backbone_weights

TINY = dict(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 6), window_size=4, img_size=64)


def test_swin_base_parameter_count():
    model = build_backbone()
    n = sum(p.numel() for p in model.parameters())
    assert 86e6 <= n <= 88e6, n
    assert model.num_features == 1024


def test_tiny_swin_pooled_features_at_two_resolutions():
    model = build_backbone("swin_tiny_patch4_window7_224", TINY).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 192)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 192)  # strict_img_size off


def test_swin_built_for_one_size_runs_another_with_that_sizes_masks():
    """A Swin built for 128 px, fed 64 px views (as the local views of a pre-training run), must
    equal a Swin built for 64 px with the same weights: the shifted-window masks are made for
    the input. Every stage has a shifted block (depth 2) and is larger than the window at both
    sizes, so both models use the same windows and shifts; only the masks could differ."""
    arch = dict(embed_dim=8, depths=(2, 2, 2), num_heads=(1, 2, 2), window_size=2)
    big = build_backbone("swin_tiny_patch4_window7_224", {**arch, "img_size": 128}).eval()
    small = build_backbone("swin_tiny_patch4_window7_224", {**arch, "img_size": 64}).eval()
    small.load_state_dict(big.state_dict())
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = small(x)
        torch.testing.assert_close(big(x), reference, rtol=0, atol=1e-6)
        # the mask matters: without it (the bug this guards against) the features differ
        for block in big.modules():
            if hasattr(block, "dynamic_mask"):
                block.dynamic_mask, block.attn_mask = False, None
        assert (big(x) - reference).abs().max() > 1e-3


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown timm model"):
        build_backbone("no_such_model_xyz")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_init_checkpoint_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    source = build_backbone("swin_tiny_patch4_window7_224", TINY)
    state = {f"module.backbone.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / f"init{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    torch.manual_seed(1)
    loaded = build_backbone("swin_tiny_patch4_window7_224", TINY, init_checkpoint=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source.eval()(x))


def test_init_checkpoint_errors(tmp_path):
    model = build_backbone("swin_tiny_patch4_window7_224", TINY)
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(model, tmp_path / "missing.pth")
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no tensor matches"):
        load_backbone_weights(model, tmp_path / "other.pth")


class Evil:
    """Any non-tensor Python object: unpickling it would run arbitrary code."""


def test_init_checkpoint_refuses_pickled_objects(tmp_path):
    torch.save({"state_dict": {}, "obj": Evil()}, tmp_path / "evil.pth")
    model = build_backbone("swin_tiny_patch4_window7_224", TINY)
    with pytest.raises(ValueError, match="weights_only"):
        load_backbone_weights(model, tmp_path / "evil.pth")


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = build_backbone("swin_tiny_patch4_window7_224", {**TINY, "drop_path_rate": 0.0})
    ckpt = build_backbone("swin_tiny_patch4_window7_224", {**TINY, "drop_path_rate": 0.0}, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    plain(x).sum().backward()
    ckpt(x).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
