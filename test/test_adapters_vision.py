"""Prismatic vision path: the timm-compatible ViTs against an independent computation, and preprocessing."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from specprune_ros.adapters.preprocessing import ImageTransform
from specprune_ros.adapters.prismatic import PrismaticProjector, PrismaticVisionBackbone
from specprune_ros.adapters.tiny import _randomise
from specprune_ros.adapters.vit import VisionTransformer, timm_spec

DINO = ('vit_large_patch14_reg4_dinov2.lvd142m', dict(embed_dim=32, depth=3, num_heads=2))
SIGLIP = ('vit_so400m_patch14_siglip_224', dict(embed_dim=48, depth=3, num_heads=2))


def make_vit(model_id, overrides, seed=0):
    vit = VisionTransformer(timm_spec(model_id, 56, None, overrides)).eval()
    _randomise(vit, torch.Generator().manual_seed(seed))
    return vit


def by_hand(state: dict, spec, x: torch.Tensor, last_block: int) -> torch.Tensor:
    """Second-to-last-block patch tokens from the raw state dict, written out with plain tensor algebra."""
    eps = spec.norm_eps
    w = state['patch_embed.proj.weight']
    patches = x.unfold(2, spec.patch_size, spec.patch_size).unfold(3, spec.patch_size, spec.patch_size)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], -1, w[0].numel())
    h = patches @ w.reshape(w.shape[0], -1).T + state['patch_embed.proj.bias']
    prefix = []
    if spec.class_token:
        prefix.append(state['cls_token'].expand(x.shape[0], -1, -1))
    if spec.reg_tokens:
        prefix.append(state['reg_token'].expand(x.shape[0], -1, -1))
    if spec.no_embed_class:
        h = torch.cat(prefix + [h + state['pos_embed']], dim=1)
    else:
        h = torch.cat(prefix + [h], dim=1) + state['pos_embed']
    heads, hd = spec.num_heads, spec.embed_dim // spec.num_heads
    for i in range(last_block + 1):
        p = f'blocks.{i}.'
        y = F.layer_norm(h, (spec.embed_dim,), state[p + 'norm1.weight'], state[p + 'norm1.bias'], eps)
        qkv = y @ state[p + 'attn.qkv.weight'].T + state[p + 'attn.qkv.bias']
        q, k, v = qkv.reshape(*y.shape[:2], 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, dim=-1) @ v
        y = attn.transpose(1, 2).reshape(y.shape) @ state[p + 'attn.proj.weight'].T + state[p + 'attn.proj.bias']
        h = h + y * state.get(p + 'ls1.scale_factor', 1.0)
        y = F.layer_norm(h, (spec.embed_dim,), state[p + 'norm2.weight'], state[p + 'norm2.bias'], eps)
        y = F.gelu(y @ state[p + 'mlp.fc1.weight'].T + state[p + 'mlp.fc1.bias'])
        y = y @ state[p + 'mlp.fc2.weight'].T + state[p + 'mlp.fc2.bias']
        h = h + y * state.get(p + 'ls2.scale_factor', 1.0)
    return h[:, spec.num_prefix_tokens:]


@pytest.mark.parametrize('model', [DINO, SIGLIP], ids=['dinov2', 'siglip'])
def test_patch_features_are_the_second_to_last_block_without_prefix_tokens(model):
    vit = make_vit(*model)
    spec = vit.spec
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        got = vit(x)
        expected = by_hand(vit.state_dict(), spec, x, last_block=spec.depth - 2)
        last = by_hand(vit.state_dict(), spec, x, last_block=spec.depth - 1)
    assert got.shape == (2, 16, spec.embed_dim)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, last, atol=1e-3)                     # not the last block
    names = set(vit.state_dict())
    if spec.layer_scale:
        assert {'cls_token', 'reg_token', 'blocks.0.ls1.scale_factor'} <= names and 'attn_pool.latent' not in names
    else:
        assert 'attn_pool.latent' in names and 'cls_token' not in names


def test_fused_backbone_splits_channels_and_concatenates_features():
    specs = [timm_spec(DINO[0], 56, None, DINO[1]), timm_spec(SIGLIP[0], 56, None, SIGLIP[1])]
    backbone = PrismaticVisionBackbone(specs).eval()
    _randomise(backbone, torch.Generator().manual_seed(1))
    x = torch.randn(1, 6, 56, 56)
    with torch.no_grad():
        fused = backbone(x)
        dino, siglip = backbone.featurizer(x[:, :3]), backbone.fused_featurizer(x[:, 3:])
    assert fused.shape == (1, 16, 80) and torch.equal(fused, torch.cat([dino, siglip], dim=2))
    projector = PrismaticProjector(True, 80, 64)
    assert (projector.fc1.out_features, projector.fc2.out_features, projector.fc3.out_features) == (320, 64, 64)


def test_preprocessing_resizes_with_pil_and_normalises_per_backbone():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(90, 130, 3), dtype=np.uint8)
    transform = ImageTransform(size=56)
    frame = transform.frame(image)
    expected = np.asarray(Image.fromarray(image).resize((56, 56), Image.BICUBIC))
    np.testing.assert_array_equal(frame, expected)
    white = np.full((56, 56, 3), 255, dtype=np.uint8)
    pixels = transform.pixels([white, white])
    assert pixels.shape == (2, 6, 56, 56)
    dino = (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(pixels[0, :3, 0, 0].numpy(), dino, rtol=1e-6)
    np.testing.assert_allclose(pixels[0, 3:, 0, 0].numpy(), [1.0, 1.0, 1.0], rtol=1e-6)
    assert transform.frame(white) is not white and np.array_equal(transform.frame(white), white)  # no resampling


def test_center_crop_keeps_the_central_90_percent_of_the_area():
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    image[2:98, 2:98] = 200                           # a 2-px black border; the crop keeps the central 95 px
    cropped = ImageTransform(size=100, center_crop=True).frame(image)
    assert cropped.shape == (100, 100, 3) and cropped.min() >= 150 and cropped[0, 0, 0] > 150
    plain = ImageTransform(size=100).frame(image)
    assert plain[0, 0, 0] == 0


def test_center_crop_samples_the_box_corner_aligned_as_the_evaluation_scripts():
    """tf.image.crop_and_resize: column i reads source x = 0.0256 * 223 + i * sqrt(0.9) * 223 / 223, bilinear."""
    ramp = np.repeat(np.arange(224, dtype=np.uint8)[None, :, None], 224, axis=0).repeat(3, axis=2)
    cropped = ImageTransform(size=224, center_crop=True).frame(ramp)[112, :, 0].astype(float)
    low = (1 - np.sqrt(0.9)) / 2 * 223
    read = low + np.arange(224) * np.sqrt(0.9)                  # where each output column samples the source
    np.testing.assert_array_equal(cropped, np.floor(read * 255.5 / 255))   # uint8 <- x * 255.5, truncated


def test_letterbox_pads_to_a_square_with_the_mean_colour():
    """Prismatic's processor fills with the mean of its last backbone (SigLIP's 0.5 for DINOv2 + SigLIP)."""
    image = np.full((20, 40, 3), 10, dtype=np.uint8)
    frame = ImageTransform(size=40, resize_strategy='letterbox', interpolation='nearest').frame(image)
    assert frame.shape == (40, 40, 3)
    assert tuple(frame[0, 0]) == (127, 127, 127) and tuple(frame[20, 20]) == (10, 10, 10)


def test_resize_crop_truncates_the_long_side_and_centres_the_crop_as_torchvision():
    image = np.random.default_rng(0).integers(0, 255, size=(480, 640, 3), dtype=np.uint8)
    frame = ImageTransform(size=224, resize_strategy='resize-crop').frame(image)
    resized = Image.fromarray(image).resize((298, 224), Image.BICUBIC)        # 224 * 640 / 480 = 298.67 -> 298
    np.testing.assert_array_equal(frame, np.asarray(resized.crop((37, 0, 261, 224))))   # round((298 - 224) / 2)


def test_bad_frames_and_settings_are_refused():
    with pytest.raises(ValueError, match='uint8'):
        ImageTransform().frame(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match='image_resize_strategy'):
        ImageTransform(resize_strategy='squash')


def test_matches_timm_when_installed():
    """Parity with timm 0.9.x's VisionTransformer + Prismatic's LayerScale patch (skipped without timm)."""
    timm = pytest.importorskip('timm', reason='timm not installed: the ViT equivalence with timm is checked only where '
                                              'timm exists; shapes are covered by the other tests here')
    from timm.models.vision_transformer import LayerScale
    for model_id, overrides in (DINO, SIGLIP):
        ours = make_vit(model_id, overrides)
        reference = timm.create_model(model_id, pretrained=False, num_classes=0, img_size=56, act_layer=None,
                                      **overrides).eval()
        for module in reference.modules():
            if isinstance(module, LayerScale):
                module.scale_factor = torch.nn.Parameter(module.gamma.clone())
                del module.gamma
                module.forward = (lambda self, x: x * self.scale_factor).__get__(module)
        reference.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(1, 3, 56, 56)
        with torch.no_grad():
            expected = reference.get_intermediate_layers(x, n={len(reference.blocks) - 2})[0]
            assert torch.allclose(ours(x), expected, atol=1e-5)
