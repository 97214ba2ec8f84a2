"""Shifted-window attention masks are built once per input size and then cached.

``enable_dynamic_size`` lets a Swin run at any size (96 px local views through a 224 px
model) by making each block build its mask for the features it gets; timm would rebuild it
in every forward. The cache must change nothing but the work: outputs and gradients equal,
bit for bit, those of timm's own dynamic-mask path (``strict_img_size=False``, which calls
timm's ``get_attn_mask`` in every forward), and the ``state_dict`` is the plain model's.
"""

from __future__ import annotations

import copy
import pickle
from collections import Counter

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from midol.models import build_backbone
from midol.models.backbone import CachedAttnMask

NAME = "swin_tiny_patch4_window7_224"
# 64 px: features 16, 8, 4, 2 with window 2, so stages 1-3 have a shifted block; at 32 px
# the last stage (1 x 1 features) is padded to its window.
ARCH = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4), "window_size": 2,
        "img_size": 64, "drop_path_rate": 0.0}
SIZES = (64, 32)


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours: build_backbone, cached masks; reference: timm's uncached dynamic masks), one set
    of weights."""
    torch.manual_seed(0)
    ours = build_backbone(NAME, ARCH).eval()
    reference = timm.create_model(NAME, pretrained=False, num_classes=0, strict_img_size=False, **ARCH)
    reference.load_state_dict(ours.state_dict())
    return ours, reference.eval()


def _blocks(model: torch.nn.Module) -> list[SwinTransformerBlock]:
    return [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]


def _image(size: int, seed: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_every_block_gets_the_cache_and_the_reference_does_not():
    ours, reference = _models()
    blocks = _blocks(ours)
    assert len(blocks) == 8
    assert all(isinstance(b.get_attn_mask, CachedAttnMask) and b.get_attn_mask.block is b for b in blocks)
    assert all(b.dynamic_mask and b.attn_mask is None for b in blocks)
    assert not any(isinstance(b.get_attn_mask, CachedAttnMask) for b in _blocks(reference))
    assert all(b.dynamic_mask for b in _blocks(reference))  # the reference is dynamic too
    # shifted blocks exist, so the masks matter: the second block of stages 1-3
    assert [any(b.shift_size) for b in blocks] == [False, True] * 3 + [False, False]


def test_outputs_and_gradients_equal_the_uncached_dynamic_masks_bit_for_bit():
    ours, reference = _models()
    for step, size in enumerate((*SIZES, *SIZES)):  # the second round reads the cache
        x = _image(size, seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = ours(xa), reference(xb)
        assert out_a.shape == (2, 128)
        assert torch.equal(out_a, out_b), (size, (out_a - out_b).abs().max())
        weight = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(100 + step))
        ours.zero_grad()
        reference.zero_grad()
        (out_a * weight).sum().backward()
        (out_b * weight).sum().backward()
        assert torch.equal(xa.grad, xb.grad)
        assert xa.grad.abs().max() > 0
        for (name, pa), pb in zip(ours.named_parameters(), reference.parameters()):
            assert pa.grad is not None, name
            assert torch.equal(pa.grad, pb.grad), name


def test_each_mask_is_built_once_per_size(monkeypatch):
    builds: Counter[tuple[int, int, int]] = Counter()
    original = SwinTransformerBlock.get_attn_mask

    def counting(self, x=None, device=None, dtype=None):
        if x is not None:  # (x is None: timm's static mask at construction)
            builds[(id(self), x.shape[1], x.shape[2])] += 1
        return original(self, x, device=device, dtype=dtype)

    monkeypatch.setattr(SwinTransformerBlock, "get_attn_mask", counting)
    ours, _ = _models()
    blocks = _blocks(ours)
    with torch.no_grad():
        for size in (64, 64, 32, 64, 32, 32):
            ours(_image(size, seed=size))
    # padded feature sizes of each stage's blocks at 64 and 32 px; in the last stage the 1 x 1
    # features at 32 px are padded to the 2 x 2 window, the size they have at 64 px
    padded = [(16, 8), (16, 8), (8, 4), (8, 4), (4, 2), (4, 2), (2,), (2,)]
    # each built once: 14 builds, where timm would make 8 x 6 = 48
    assert builds == Counter({(id(b), n, n): 1 for b, sizes in zip(blocks, padded) for n in sizes})
    for block, sizes in zip(blocks, padded):
        cache = block.get_attn_mask.cache
        assert sorted(k[:2] for k in cache) == sorted((n, n) for n in sizes)  # one per size
        for (h, w, device, dtype, window, shift), mask in cache.items():
            assert device == torch.device("cpu") and dtype == torch.float32
            assert (window, shift) == (block.window_size, block.shift_size)
            fresh = original(block, torch.zeros(1, h, w, 1))
            if not any(shift):
                assert mask is None and fresh is None
            else:
                assert torch.equal(mask, fresh)
                assert mask.shape == ((h // window[0]) * (w // window[1]),) + (window[0] * window[1],) * 2
                assert set(mask.unique().tolist()) == {-100.0, 0.0}


def test_one_entry_per_dtype_and_device():
    ours, _ = _models()
    block = _blocks(ours)[1]
    with torch.no_grad():
        ours(_image(64, 0))
        ours.double()(_image(64, 0).double())
    assert [(k[3], m.dtype) for k, m in block.get_attn_mask.cache.items()] == [
        (torch.float32, torch.float32), (torch.float64, torch.float64)]
    if torch.cuda.is_available():
        with torch.no_grad():
            ours.float().cuda()(_image(64, 0).cuda())
        devices = [(k[2].type, m.device.type) for k, m in block.get_attn_mask.cache.items()]
        assert devices == [("cpu", "cpu"), ("cpu", "cpu"), ("cuda", "cuda")]


def test_state_dict_keys_are_the_plain_timm_models():
    ours, _ = _models()
    plain = timm.create_model(NAME, pretrained=False, num_classes=0, **ARCH)  # static masks
    keys = list(plain.state_dict())
    assert list(ours.state_dict()) == keys
    with torch.no_grad():
        ours(_image(64, 0))
        ours(_image(32, 0))
    assert list(ours.state_dict()) == keys  # the filled cache is not a buffer
    assert not any("mask" in name for name, _ in ours.named_buffers())
    plain.load_state_dict(ours.state_dict())  # strict


def test_mask_first_built_under_inference_mode_serves_training():
    """Lightning validates under ``inference_mode``; a mask cached there is an ordinary
    tensor, usable by the training step that follows."""
    ours, reference = _models()
    with torch.inference_mode():
        ours(_image(64, 0))
    cache = _blocks(ours)[1].get_attn_mask.cache
    assert len(cache) == 1
    assert not any(m.is_inference() for m in cache.values())
    x = _image(64, 1)
    out = ours(x)
    out.sum().backward()
    assert torch.equal(out, reference(x))
    assert all(p.grad is not None for p in ours.parameters())


def test_deepcopy_and_pickle_keep_one_cache_per_block():
    """The EMA teacher is a deep copy of the student: its blocks must cache for themselves."""
    ours, reference = _models()
    with torch.no_grad():
        ours(_image(64, 0))
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        for block, original in zip(_blocks(clone), _blocks(ours)):
            assert block.get_attn_mask.block is block
            assert block.get_attn_mask.cache is not original.get_attn_mask.cache
        with torch.no_grad():
            x = _image(32, 2)
            assert torch.equal(clone(x), reference(x))
        assert len(_blocks(clone)[1].get_attn_mask.cache) == 2
        assert len(_blocks(ours)[1].get_attn_mask.cache) == 1


def test_enable_dynamic_size_twice_wraps_once():
    from midol.models.backbone import enable_dynamic_size

    ours, _ = _models()
    wrappers = [b.get_attn_mask for b in _blocks(ours)]
    enable_dynamic_size(ours)
    assert [b.get_attn_mask for b in _blocks(ours)] == wrappers
    assert all(w.block is b for w, b in zip(wrappers, _blocks(ours)))


@pytest.mark.parametrize("size", [64, 32])
def test_the_mask_still_matters(size):
    """With the mask dropped (the bug ``dynamic_mask`` guards against) the features differ,
    so the equalities above test the cached masks, not masks that do nothing."""
    ours, reference = _models()
    x = _image(size, 3)
    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(ours(x), expected)
        for block in _blocks(ours):
            block.dynamic_mask = False  # timm then reads block.attn_mask, which is None
        assert (ours(x) - expected).abs().max() > 1e-4
