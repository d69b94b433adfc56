"""The timm model contract for every TITN variant, the paper's parameter counts and the head semantics."""

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import SHIPPED_FOLDERS
from titn_lib.titn import default_cfgs

TINY = ['titn_tiny_patch8_32', 'titn_tiny_patch16_32']
LARGE = ['titn_small_patch16_224', 'titn_base_patch16_224']
ALL = TINY + LARGE


def small(name='titn_tiny_patch8_32', **kwargs):
    """A 2-block copy of a variant, for tests that exercise mechanics rather than size."""
    return timm.create_model(name, depth=2, **kwargs)


@pytest.mark.parametrize('name', ALL)
def test_registered_and_forward_backward(name):
    assert name in timm.list_models('titn_*')
    model = timm.create_model(name, num_classes=7)
    size = model.pretrained_cfg['input_size']
    x = torch.randn(1, *size)
    out = model(x)
    assert out.shape == (1, 7)
    out.sum().backward()
    assert model.num_prefix_tokens == 2
    assert model.num_features == model.head_hidden_size == model.embed_dim


@pytest.mark.parametrize('name,tolerance', [('titn_tiny_patch8_32', 0.03e6), ('titn_tiny_patch16_32', 0.05e6)])
def test_paper_parameter_count(name, tolerance):
    model = timm.create_model(name, num_classes=10)
    assert abs(sum(p.numel() for p in model.parameters()) - 5.85e6) <= tolerance


def test_paper_flops_per_image():
    """Paper Table 3: 111.40 GFLOPs per batch of 1024 = 0.1088 GMACs per image."""
    from titn_lib.evaluate import gmacs_per_image
    model = timm.create_model('titn_tiny_patch8_32', num_classes=100)
    assert abs(gmacs_per_image(model, (3, 32, 32)) - 111.40 / 1024) < 0.002


@pytest.mark.parametrize('cfg_name', list(default_cfgs))
def test_default_cfgs(cfg_name):
    _, _, tag = cfg_name.partition('.')
    model = timm.create_model(cfg_name, depth=1)
    cfg = model.pretrained_cfg
    state = model.state_dict()
    for classifier in cfg['classifier']:
        assert f'{classifier}.weight' in state
    assert f"{cfg['first_conv']}.weight" in state
    assert cfg['classifier'] == ('head', 'head_dist')
    assert model.in_chans == cfg['input_size'][0]
    assert tuple(model.pixel_embed.img_size) == tuple(cfg['input_size'][1:])
    assert len(cfg['mean']) == len(cfg['std']) == cfg['input_size'][0]
    if tag:  # a Hub id only where weights are published
        assert cfg['hf_hub_id'] == (f'titn-lib/{cfg_name}' if cfg_name in SHIPPED_FOLDERS else None)
        assert cfg['num_classes'] == {'cifar10': 10, 'cifar100': 100, 'mnist': 10}[tag]
        assert cfg['license'] and cfg['paper_name']
        assert len(cfg['label_names']) == cfg['num_classes']


def test_reset_classifier_and_pre_logits():
    model = small(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.head_hidden_size)
    head, head_dist = model.get_classifier()
    assert head is model.head and head_dist is model.head_dist
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(5)
    assert model.head.out_features == model.head_dist.out_features == 5
    assert model(x).shape == (2, 5)


def test_distilled_tuple_and_average_semantics():
    model = small(num_classes=4)
    x = torch.randn(3, 3, 32, 32)
    feats = model.forward_features(x)
    cls_logits, dist_logits = model.head(feats[:, 0]), model.head_dist(feats[:, 1])
    model.eval()
    torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)
    model.set_distilled_training(True)
    torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)  # eval mode: still the average
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    torch.testing.assert_close(out[0], cls_logits)
    torch.testing.assert_close(out[1], dist_logits)
    model.set_distilled_training(False)
    torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)


def test_every_parameter_gets_a_gradient():
    model = timm.create_model('titn_tiny_patch8_32', num_classes=10)
    model.set_distilled_training(True)
    cls_logits, dist_logits = model(torch.randn(2, 3, 32, 32))
    (F.cross_entropy(cls_logits, torch.tensor([0, 1])) + F.cross_entropy(dist_logits, torch.tensor([2, 3]))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_attention_matches_softmax_reference():
    from titn_lib.layers import Attention
    attn = Attention(12, num_heads=2)
    x = torch.randn(5, 16, 12)
    fused = attn(x)
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 2, 6).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / 6 ** 0.5, dim=-1)
    reference = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(fused, reference, atol=1e-6, rtol=1e-5)
    attn.fused_attn = False
    torch.testing.assert_close(attn(x), reference, atol=1e-6, rtol=1e-5)


def _straightforward_titn(model, x):
    """TITN written the plain way (nn.Unfold, permuted qkv copies, explicit softmax, slice + cat), with the
    model's parameters: the reference for the faster layouts in titn_lib.layers."""
    B, C = x.shape[:2]
    pe = model.pixel_embed
    p, N, P = pe.patch_size[0], pe.num_patches, pe.num_pixel
    patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2).reshape(B * N, C, p, p)
    pixels = (pe.proj(patches) + pe.pixel_pos).reshape(B * N, -1, P).transpose(1, 2)

    def attention(attn, t):
        n, L, D = t.shape
        qkv = attn.qkv(t).reshape(n, L, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * attn.scale, dim=-1)
        return attn.proj((weights @ qkv[2]).transpose(1, 2).reshape(n, L, D))

    def block(b, t):
        t = t + attention(b.attn, b.norm1(t))
        return t + b.mlp(b.norm2(t))

    def pixel_to_patch(pp, pix):
        return pp.norm2_proj(pp.proj(pp.norm1_proj(pix.reshape(B, N, -1))))

    tokens = torch.cat([model.cls_token.expand(B, -1, -1), model.dist_token.expand(B, -1, -1),
                        pixel_to_patch(model.patch_embed, pixels)], dim=1) + model.patch_pos
    for blk in model.blocks:
        pixels = block(blk.inner, pixels)
        tokens = torch.cat([tokens[:, :2], tokens[:, 2:] + pixel_to_patch(blk.outer.pixel_proj, pixels)], dim=1)
        tokens = block(blk.outer, tokens)
    tokens = model.norm(tokens)
    return (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2


def test_fast_path_matches_straightforward_formulation():
    """Outputs and every gradient (parameters and input) within 1e-5 in float32 (issue: performance)."""
    torch.manual_seed(0)
    model = timm.create_model('titn_tiny_patch8_32', num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    grads = []
    for forward in (model, lambda t: _straightforward_titn(model, t)):
        model.zero_grad()
        x.grad = None
        out = forward(x)
        (out * torch.linspace(-1, 1, 10)).mean().backward()
        grads.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast_out, fast_dx, fast_dp), (ref_out, ref_dx, ref_dp) = grads
    torch.testing.assert_close(fast_out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_dx, ref_dx, atol=1e-5, rtol=1e-5)
    assert fast_dp.keys() == ref_dp.keys()
    for name in ref_dp:
        torch.testing.assert_close(fast_dp[name], ref_dp[name], atol=1e-5, rtol=1e-5, msg=name)


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file
    model = small(num_classes=10).eval()
    path = tmp_path / 'model.safetensors'
    save_file(model.state_dict(), str(path))
    other = small(num_classes=10).eval()
    other.load_state_dict(load_file(str(path)))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), other(x))


def _pretrained_from(path, name='titn_tiny_patch8_32', **kwargs):
    return timm.create_model(name, pretrained=True, depth=2,
                             pretrained_cfg_overlay=dict(file=str(path), hf_hub_id=None), **kwargs)


def test_load_at_another_image_size(tmp_path):
    from safetensors.torch import save_file
    source = small(num_classes=10)
    save_file(source.state_dict(), str(tmp_path / 'w.safetensors'))
    model = _pretrained_from(tmp_path / 'w.safetensors', num_classes=10, img_size=64)
    assert model.patch_pos.shape == (1, 2 + 64, 192)
    torch.testing.assert_close(model.patch_pos[:, :2], source.patch_pos[:, :2])  # prefix rows kept
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    # the resampled grid is an interpolation of the source grid, not a fresh initialisation
    src_grid = source.patch_pos[0, 2:].reshape(4, 4, -1)
    new_grid = model.patch_pos[0, 2:].reshape(8, 8, -1)
    assert F.cosine_similarity(new_grid.mean((0, 1)), src_grid.mean((0, 1)), dim=0) > 0.9


def test_load_across_channel_counts(tmp_path):
    from safetensors.torch import save_file
    rgb = small(num_classes=10)
    save_file(rgb.state_dict(), str(tmp_path / 'rgb.safetensors'))
    gray = _pretrained_from(tmp_path / 'rgb.safetensors', num_classes=10, in_chans=1)
    assert gray.pixel_embed.proj.weight.shape[1] == 1
    torch.testing.assert_close(gray.pixel_embed.proj.weight, rgb.pixel_embed.proj.weight.sum(1, keepdim=True))
    # a gray image through the 1-channel model equals the same image repeated through the RGB model
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(gray.eval()(x), rgb.eval()(x.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-4)
    # ... and back: 1-channel weights into a 3-channel model (pretrained cfg says 1 input channel)
    save_file(gray.state_dict(), str(tmp_path / 'gray.safetensors'))
    back = timm.create_model('titn_tiny_patch8_32.mnist', pretrained=True, depth=2, in_chans=3,
                             pretrained_cfg_overlay=dict(file=str(tmp_path / 'gray.safetensors'), hf_hub_id=None))
    assert back.pixel_embed.proj.weight.shape[1] == 3
    assert back(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_checkpoint_filter_accepts_training_checkpoints(tmp_path):
    from titn_lib import checkpoint_filter_fn
    model = small(num_classes=3)
    wrapped = {'model': {f'module.{k}': v for k, v in model.state_dict().items()}, 'epoch': 3}
    other = small(num_classes=3)
    other.load_state_dict(checkpoint_filter_fn(wrapped, other))
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])


@pytest.mark.parametrize('kwargs,match', [
    (dict(img_size=30), 'patch_size'),
    (dict(pixel_size=3), 'pixel_size'),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('titn_tiny_patch8_32', **kwargs)


@pytest.mark.parametrize('shape', [(1, 3, 64, 64), (1, 1, 32, 32), (1, 3, 32, 31), (3, 32, 32)])
def test_bad_input_shape(shape):
    model = small()
    with pytest.raises(ValueError, match=r'expected an image batch of shape \(B, 3, 32, 32\)'):
        model(torch.randn(*shape))


def test_forward_intermediates_and_features_only():
    model = small(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 2 and all(t.shape == (2, 192, 4, 4) for t in inter)
    torch.testing.assert_close(final, model.forward_features(x))
    nlc = model.forward_intermediates(x, indices=[0], output_fmt='NLC', intermediates_only=True)
    assert nlc[0].shape == (2, 16, 192)
    with_prefix = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
    assert with_prefix[0][1].shape == (2, 2, 192)
    features = timm.create_model('titn_tiny_patch8_32', features_only=True, out_indices=(0, 1), depth=2)
    maps = features(x)
    assert [m.shape for m in maps] == [(2, 192, 4, 4)] * 2
    assert features.feature_info.channels() == [192, 192]
    assert model.prune_intermediate_layers(indices=[0]) == [0]
    assert len(model.blocks) == 1 and model.num_classes == 0
    assert model.forward_intermediates(x, intermediates_only=True)[0].shape == (2, 192, 4, 4)


def test_grad_checkpointing_same_result():
    model = small(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-6, rtol=1e-5)


def test_no_weight_decay_and_group_matcher():
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2
    model = small(num_classes=10)
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    groups = group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(names)
    assert set(groups) == {0, 1, 2, 3}  # stem, two blocks, norm + heads
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    no_decay = {id(p) for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert id(model.dist_token) in no_decay and id(model.patch_pos) in no_decay


def test_torch_jit_script():
    model = small(num_classes=10).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scripted(x), model(x))


def test_torch_compile():
    model = small(num_classes=10).eval()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


def test_onnx_export_matches_pytorch(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnx')
    model = small(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    path = str(tmp_path / 'titn.onnx')
    torch.onnx.export(model, (x,), path, input_names=['image'], output_names=['logits'],
                      dynamic_axes={'image': {0: 'batch'}}, dynamo=False)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for batch in (2, 5):
        xb = torch.randn(batch, 3, 32, 32)
        (onnx_out,) = session.run(None, {'image': xb.numpy()})
        torch.testing.assert_close(torch.from_numpy(onnx_out), model(xb), atol=1e-4, rtol=1e-4)


def test_timm_token_distillation_task_trains_titn():
    """timm's own DeiT distillation (TokenDistillationTask) drives TITN unchanged."""
    from timm.task import TokenDistillationTask
    student = small(num_classes=10)
    teacher = timm.create_model('aircnn_small_32', num_classes=10, in_chans=3)
    task = TokenDistillationTask(student, teacher, criterion=torch.nn.CrossEntropyLoss(), distill_type='hard',
                                 task_loss_weight=0.5, verbose=False)
    task.train()
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    losses = []
    for _ in range(3):
        result = task(x, y)
        opt.zero_grad()
        result['loss'].backward()
        opt.step()
        losses.append(result['loss'].item())
    assert set(result) >= {'loss', 'task_loss', 'distill_loss'}
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in teacher.parameters())


def test_list_pretrained_names_exactly_the_published_weights():
    assert sorted(timm.list_pretrained('titn_*') + timm.list_pretrained('aircnn_*')) == SHIPPED_FOLDERS


def test_public_blocks_compose():
    """The building blocks users import work on their own, in the shapes their docstrings give."""
    from titn_lib import DistillationHead, InnerBlock, OuterBlock, PixelEmbed
    embed = PixelEmbed(img_size=16, patch_size=8, pixel_size=2, in_chans=3, inner_dim=12)
    pixels = InnerBlock(12, num_heads=2)(embed(torch.randn(2, 3, 16, 16)))
    assert pixels.shape == (2 * 4, 16, 12)
    patches = torch.randn(2, 2 + 4, 48)
    out = OuterBlock(48, num_heads=3, num_pixel=16, inner_dim=12)(patches, pixels)
    assert out.shape == patches.shape and not torch.equal(out, patches)
    head = DistillationHead(48, num_classes=5).train()
    torch.testing.assert_close(head(out), sum(head.head(out[:, i]) if i == 0 else head.head_dist(out[:, i])
                                              for i in (0, 1)) / 2)
    head.set_distilled_training(True)
    cls_logits, dist_logits = head(out)
    torch.testing.assert_close(dist_logits, head.head_dist(out[:, 1]))


@pytest.mark.parametrize('name', ['titn_tiny_patch8_32', 'aircnn_wide_32', 'aircnn_small_32'])
def test_device_and_dtype_keywords(name):
    meta = timm.create_model(name, device='meta')
    assert {p.device.type for p in meta.parameters()} == {'meta'}
    half = timm.create_model(name, dtype=torch.bfloat16, num_classes=10)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    half.reset_classifier(4)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_torch_fx_tracing_and_feature_extraction():
    from timm.models import create_feature_extractor as timm_extractor
    from torchvision.models.feature_extraction import create_feature_extractor as tv_extractor
    model = small(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))
    with pytest.raises(ValueError, match='expected an image batch'):  # the check survives tracing
        traced(torch.randn(2, 3, 16, 16))
    for extractor in (timm_extractor, tv_extractor):
        features = extractor(model, return_nodes={'blocks.1': 'block', 'norm': 'norm'})(x)
        torch.testing.assert_close(features['norm'], model.forward_features(x))
    train = timm_extractor(small(num_classes=10).train(), return_nodes={'norm': 'norm'})
    train(x)['norm'].sum().backward()
    assert all(p.grad is not None for p in train.parameters() if p.requires_grad and p.ndim > 1)


def test_fused_attention_follows_timm_switch():
    from timm.layers import set_fused_attn
    reference = small(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    try:
        set_fused_attn(False)
        explicit = small(num_classes=10).eval()
    finally:
        set_fused_attn(True)
    assert not explicit.blocks[0].inner.attn.fused_attn and reference.blocks[0].outer.attn.fused_attn
    explicit.load_state_dict(reference.state_dict())
    torch.testing.assert_close(explicit(x), reference(x), atol=1e-5, rtol=1e-5)


def test_features_out_as_deit_and_empty_batch():
    model = timm.create_model('titn_tiny_patch8_32', num_classes=0, global_pool='', depth=1)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    model.reset_classifier(0, '')
    model.reset_classifier(5, 'token')
    assert model(torch.randn(0, 3, 32, 32)).shape == (0, 5)  # an empty batch, as timm's ViT
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(5, 'avg')


@pytest.mark.parametrize('kwargs,match', [(dict(num_classes=-1), 'num_classes'), (dict(patch_size=0), 'positive'),
                                          (dict(pixel_size=0), 'positive')])
def test_invalid_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('titn_tiny_patch8_32', depth=1, **kwargs)


def test_pixel_grid_change_is_refused():
    from titn_lib import checkpoint_filter_fn
    trained = small(num_classes=3)  # patch 8, pixel 2: a 4x4 pixel grid
    other = small(num_classes=3, pixel_size=4)  # a 2x2 pixel grid
    with pytest.raises(ValueError, match='pixel grid'):
        checkpoint_filter_fn(trained.state_dict(), other)


def test_one_loader_for_every_checkpoint_kind(tmp_path):
    """DDP / torch.compile prefixes in either order, timm-style ``state_dict`` and ``titn train`` ``model`` entries
    and safetensors all load through load_model_state, for TITN and for any other model."""
    from safetensors.torch import save_file
    from titn_lib.modeling import load_model_state
    for name in ('titn_tiny_patch8_32', 'aircnn_small_32'):
        source = timm.create_model(name, num_classes=3, in_chans=3, **(dict(depth=1) if 'titn' in name else {}))
        state = source.state_dict()
        kinds = {
            'compiled_ddp.pth': {'state_dict': {f'_orig_mod.module.{k}': v for k, v in state.items()}},
            'ddp_compiled.pth': {'model': {f'module._orig_mod.{k}': v for k, v in state.items()}, 'epoch': 1},
            'plain.safetensors': state,
        }
        for file, content in kinds.items():
            path = str(tmp_path / f'{name}_{file}')
            save_file(content, path) if file.endswith('.safetensors') else torch.save(content, path)
            target = timm.create_model(name, num_classes=3, in_chans=3, **(dict(depth=1) if 'titn' in name else {}))
            load_model_state(target, path)
            for k, v in state.items():
                assert torch.equal(target.state_dict()[k], v), (name, file, k)


def test_forward_intermediates_values():
    model = small(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    # by hand: the patch tokens after each block, normalised, without the two prefix rows
    pixels, patches = model._embed(x)
    by_hand = []
    for blk in model.blocks:
        pixels, patches = blk(pixels, patches)
        by_hand.append(model.norm(patches)[:, 2:])
    inter = model.forward_intermediates(x, norm=True, output_fmt='NLC', intermediates_only=True)
    for got, expected in zip(inter, by_hand):
        torch.testing.assert_close(got, expected)
    early = model.forward_intermediates(x, indices=[0], norm=True, stop_early=True, output_fmt='NLC')
    torch.testing.assert_close(early[1][0], by_hand[0])
    torch.testing.assert_close(early[0], model.norm(model.blocks[0](*model._embed(x))[1]))  # stopped after block 0


def test_timm_token_distillation_task_builds_the_teacher_by_name(tmp_path):
    """timm's KD path (train.py --kd-model-name ... --kd-distill-type token): the teacher built by name, with the
    device/dtype keywords timm passes, from a weights file."""
    from safetensors.torch import save_file
    from timm.task import TokenDistillationTask
    trained = timm.create_model('aircnn_small_32', num_classes=10, in_chans=3)
    save_file(trained.state_dict(), str(tmp_path / 'teacher.safetensors'))
    task = TokenDistillationTask(small(num_classes=10), 'aircnn_small_32',
                                 teacher_pretrained_path=str(tmp_path / 'teacher.safetensors'),
                                 distill_type='hard', device=torch.device('cpu'), dtype=torch.float32, verbose=False)
    teacher = task.teacher.model
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in trained.state_dict().items())
    task.train()
    result = task(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert result['loss'].requires_grad and torch.isfinite(result['distill_loss'])


def test_aircnn_whitening_stem():
    """The airbench method's first layer: the stem whitens 2x2 patches (identity second moment with eps 0; both
    signs; extra filters zero) and its filters are frozen, its bias not."""
    torch.manual_seed(0)
    mixing = torch.randn(3, 3)  # correlated channels, smooth (correlated) neighbours
    images = F.avg_pool2d(torch.einsum('dc,nchw->ndhw', mixing, torch.randn(64, 3, 17, 17)), 2, stride=1)
    model = timm.create_model('aircnn_wide_32', num_classes=10)  # stem width 32 > 24
    model.init_whitening(images, eps=0)
    conv = model.stem[0]
    out = F.conv2d(images, conv.weight).double()  # [N, 32, 15, 15], without the bias
    whitened = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    torch.testing.assert_close(whitened.T @ whitened / len(whitened), torch.eye(12, dtype=torch.float64),
                               atol=2e-3, rtol=0)
    assert torch.equal(conv.weight[12:24], -conv.weight[:12]) and not conv.weight[24:].any()
    assert [name for name, p in model.named_parameters() if not p.requires_grad] == ['stem.0.weight']
    with pytest.raises(ValueError, match='stem_width=24'):
        timm.create_model('aircnn_small_32', in_chans=3).init_whitening(images)  # 16 filters
