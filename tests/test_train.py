"""titn train: end to end on tiny data, exact resume after SIGKILL, DDP with gloo, recipes and errors."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from titn_lib import train as train_lib
from titn_lib.cli import parse_train_args as parse_args
from titn_lib.train import log_line, run

from conftest import REPO_ROOT

TINY_MODEL = ['--model', 'titn_tiny_patch8_32', '--model-kwargs', 'depth=1']


def tiny_args(data_dir, output, *extra):
    return ['--dataset', 'npz', '--num-classes', '3', '--data-dir', str(data_dir), '--output', str(output),
            '--workers', '0', '-b', '16', '--epochs', '2', '--opt', 'adamw', '--lr', '1e-3', '--no-progress',
            '--val-split', '0.25', *TINY_MODEL, *extra]


def read_history(output):
    with open(os.path.join(output, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_teacher_then_distilled_student(learnable_npz, tmp_path):
    """On learnable data: the teacher learns, the student beats chance and its distillation loss falls."""
    teacher_out = tmp_path / 'teacher'
    teacher = run(parse_args(tiny_args(learnable_npz, teacher_out, '--model', 'aircnn_small_32', '--model-kwargs',
                                       '--lr', '3e-3', '--epochs', '3')))
    assert teacher['test']['top1'] > 60  # chance is 33
    summary = run(parse_args(tiny_args(
        learnable_npz, tmp_path / 'student', '--teacher', 'aircnn_small_32', '--epochs', '4',
        '--teacher-checkpoint', str(teacher_out / 'best.pth'), '--cutmix', '0.5', '--aa', 'cifar10')))
    history = read_history(tmp_path / 'student')
    assert [h['epoch'] for h in history] == [1, 2, 3, 4]
    assert {'train_loss', 'train_base', 'train_distill', 'val_top1', 'val_top5', 'val_f1', 'lr'} <= set(history[0])
    assert summary['test']['n'] == 60 and summary['test']['top1'] > 45
    assert history[-1]['train_distill'] < history[0]['train_distill']
    for name in ('last.pth', 'best.pth', 'curves.png', 'summary.json'):
        assert (tmp_path / 'student' / name).is_file()
    assert (tmp_path / 'student' / 'curves.png').read_bytes()[:4] == b'\x89PNG'


def test_log_line_keeps_small_learning_rates():
    """The epoch's log line keeps 4 significant digits: a late learning rate is not rounded to a wrong 1e-4."""
    line = json.loads(log_line(dict(epoch=36, lr=0.00014544903, val_top1=84.84, epoch_time_s=942.83882)))
    assert line == dict(epoch=36, lr=0.0001454, val_top1=84.84, epoch_time_s=942.8)


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tiny_npz, tmp_path):
    """SIGKILL during epoch 2 of 3, then --resume: the same metrics as a run that was never stopped."""
    common = tiny_args(tiny_npz, tmp_path / 'ref', '--epochs', '3', '--train-subset', '120', '--threads', '1',
                       '--val-split', '0.25')
    run(parse_args(common))
    reference = read_history(tmp_path / 'ref')

    out = tmp_path / 'killed'
    cmd = [sys.executable, '-m', 'titn_lib.train', *tiny_args(tiny_npz, out, '--epochs', '3', '--threads', '1'),
           '--resume', 'auto', '--no-test']
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / 'last.pth').exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(out / 'last.pth', weights_only=True)  # never corrupt, whenever the kill lands
    assert state['epoch'] in (1, 2)
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = read_history(out)
    assert [h['epoch'] for h in resumed] == [1, 2, 3]
    for a, b in zip(reference, resumed):
        for key in ('val_top1', 'val_top5', 'val_loss', 'train_loss', 'lr'):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


@pytest.mark.slow
def test_ddp_gloo_two_processes(tiny_npz, tmp_path):
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'titn_lib.train', *tiny_args(tiny_npz, out, '--epochs', '1', '--threads', '1')]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    history = read_history(out)
    assert len(history) == 1  # rank 0 alone writes metrics and checkpoints
    assert (out / 'last.pth').is_file() and (out / 'summary.json').is_file()
    state = torch.load(out / 'last.pth', weights_only=True)
    assert not any(k.startswith('module.') for k in state['model'])


def test_recipe_defaults_and_command_line_override(tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('epochs: 7\nlr: 0.5\ncutmix: 0.5\n')
    args = parse_args(['--recipe', str(recipe), '--lr', '0.01'])
    assert (args.epochs, args.lr, args.cutmix) == (7, 0.01, 0.5)
    recipe.write_text('epochs: 7\nlearning_rate: 0.5\n')
    with pytest.raises(ValueError, match='unknown recipe keys'):
        parse_args(['--recipe', str(recipe)])


@pytest.mark.parametrize('path', sorted(os.listdir(os.path.join(REPO_ROOT, 'recipes'))))
def test_every_shipped_recipe_builds(path):
    """Each recipe names models timm knows (or a published folder of this checkout), a known dataset, and its model
    builds (at depth 1 where it has depth)."""
    import timm
    from titn_lib.data import DATASETS
    from titn_lib.modeling import create_model
    args = parse_args(['--recipe', os.path.join(REPO_ROOT, 'recipes', path)])
    assert args.dataset in DATASETS, args.dataset
    info = DATASETS[args.dataset]
    for name in filter(None, (args.model, args.teacher)):
        if name.startswith('local-dir:'):  # a published folder of this checkout, named from the repository root
            assert os.path.isfile(os.path.join(REPO_ROOT, name[len('local-dir:'):], 'config.json')), name
        else:
            assert timm.is_model(name), name
    model_name = args.model.replace('local-dir:', f'local-dir:{REPO_ROOT}/', 1)
    kwargs = dict(num_classes=info.num_classes, in_chans=info.in_chans, img_size=args.img_size, **args.model_kwargs)
    try:
        model = create_model(model_name, depth=1, **kwargs)
    except TypeError:  # CNN teachers have no depth
        model = create_model(model_name, **kwargs)
    out = model.eval()(torch.randn(1, info.in_chans, args.img_size, args.img_size))
    assert out.shape == (1, info.num_classes)
    assert args.epochs > 0 and (args.teacher_checkpoint or not args.teacher)  # never an untrained teacher


def test_missing_and_corrupt_data(tmp_path):
    with pytest.raises(FileNotFoundError, match='no train.npz'):
        run(parse_args(tiny_args(tmp_path / 'nowhere', tmp_path / 'o')))
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'train.npz').write_bytes(b'not a zip file')
    with pytest.raises(ValueError, match='not a readable .npz'):
        run(parse_args(tiny_args(tmp_path / 'bad', tmp_path / 'o')))


def test_resume_with_another_optimizer_is_refused(tiny_npz, tmp_path):
    run(parse_args(tiny_args(tiny_npz, tmp_path / 'o', '--epochs', '1', '--no-test')))
    with pytest.raises(ValueError, match='--opt'):
        run(parse_args(tiny_args(tiny_npz, tmp_path / 'o', '--resume', 'auto', '--opt', 'sgd')))


def test_unknown_model(tiny_npz, tmp_path):
    with pytest.raises(ValueError, match='unknown model'):
        run(parse_args(tiny_args(tiny_npz, tmp_path / 'o', '--model', 'titn_gigantic')))


def test_teacher_with_wrong_class_count(tiny_npz, tmp_path):
    from timm import create_model
    teacher = create_model('aircnn_small_32', num_classes=7, in_chans=3)
    torch.save({'model': teacher.state_dict()}, tmp_path / 't.pth')
    with pytest.raises(ValueError, match='does not fit'):
        run(parse_args(tiny_args(tiny_npz, tmp_path / 'o', '--teacher', 'aircnn_small_32',
                                 '--teacher-checkpoint', str(tmp_path / 't.pth'))))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_npz, tmp_path):
    out = tmp_path / 'nan'
    run(parse_args(tiny_args(tiny_npz, out, '--epochs', '1', '--no-test')))
    good = torch.load(out / 'last.pth', weights_only=True)
    with pytest.raises(FloatingPointError, match='last good checkpoint'):  # a diverging continuation
        run(parse_args(tiny_args(tiny_npz, out, '--epochs', '2', '--resume', 'auto', '--lr', '1e30',
                                 '--no-test')))
    kept = torch.load(out / 'last.pth', weights_only=True)
    assert kept['epoch'] == good['epoch'] == 1
    for k in good['model']:
        assert torch.equal(kept['model'][k], good['model'][k])


def test_device_loader_time_budget_and_weight_average(tiny_npz, tmp_path):
    """--loader device, --model-ema and --time-budget: a budget that fits 2 epochs gives exactly the run that
    --epochs 2 gives; the better of model and average is kept, and validation runs every --eval-every epochs."""
    common = ('--loader', 'device', '--model-ema', '--model-ema-decay', '0.9', '--warmup-epochs', '1',
              '--threads', '1', '--no-test', '--aa', 'cifar10', '--cutmix', '0.5')
    run(parse_args(tiny_args(tiny_npz, tmp_path / 'fixed', *common, '--epochs', '2')))
    summary = run(parse_args(tiny_args(tiny_npz, tmp_path / 'budget', *common, '--epochs', '9',
                                       '--time-budget', '1e-6')))
    assert summary['epochs'] == 2  # the warm-up epoch plus one
    fixed, budget = read_history(tmp_path / 'fixed'), read_history(tmp_path / 'budget')
    for a, b in zip(fixed, budget):
        for key in ('lr', 'train_loss', 'val_top1', 'val_ema_top1', 'val_loss'):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    best = torch.load(tmp_path / 'budget' / 'best.pth', weights_only=True)
    last = budget[-1]
    assert best['weights'] == ('ema' if last['val_ema_top1'] > last['val_top1'] else 'model') or best['epoch'] < 2

    run(parse_args(tiny_args(tiny_npz, tmp_path / 'sparse', '--loader', 'device', '--epochs', '3',
                             '--eval-every', '2', '--save-every', '2', '--no-test', '--threads', '1')))
    assert ['val_top1' in h for h in read_history(tmp_path / 'sparse')] == [False, True, True]
    assert torch.load(tmp_path / 'sparse' / 'last.pth', weights_only=True)['epoch'] == 3
    with pytest.raises(ValueError, match='--warmup-epochs'):
        run(parse_args(tiny_args(tiny_npz, tmp_path / 'x', '--time-budget', '1')))


def test_mixup_off_epoch_leaves_the_last_epochs_unmixed(tiny_npz, tmp_path, monkeypatch):
    """--mixup-off-epoch 2: CutMix mixes the targets of epochs 1 and 2 and none of epoch 3, which a resumed run
    reaches; the flag without MixUp or CutMix is refused before training."""
    mixed = []  # per epoch: whether any batch's targets mixed two classes
    real = train_lib.train_one_epoch

    def recording(model, loader, criterion, optimizer, scheduler, epoch, cfg, scaler=None, mixup=None, ema=None):
        batches = []

        def mix(images, targets):
            images, targets = mixup(images, targets)
            batches.append(bool((targets.max(dim=1).values < 1).any()))
            return images, targets
        metrics = real(model, loader, criterion, optimizer, scheduler, epoch, cfg, scaler, mix, ema)
        mixed.append(any(batches))
        return metrics
    monkeypatch.setattr(train_lib, 'train_one_epoch', recording)
    common = ('--cutmix', '1.0', '--mixup-off-epoch', '2', '--no-test', '--threads', '1')
    run(parse_args(tiny_args(tiny_npz, tmp_path / 'o', *common, '--epochs', '2')))
    run(parse_args(tiny_args(tiny_npz, tmp_path / 'o', *common, '--epochs', '3', '--resume', 'auto')))
    assert mixed == [True, True, False]

    # --time-budget fixing 4 of 8 epochs after epoch 2 scales --mixup-off-epoch 6 to 3 (kept in last.pth)
    mixed.clear()
    monkeypatch.setattr(train_lib, 'fit_epochs_to_budget', lambda *a: 4)
    budget = ('--cutmix', '1.0', '--mixup-off-epoch', '6', '--time-budget', '1', '--warmup-epochs', '2', '--no-test',
              '--threads', '1', '--epochs', '8')
    run(parse_args(tiny_args(tiny_npz, tmp_path / 'b', *budget, '--save-every', '3')))
    kept = torch.load(tmp_path / 'b' / 'last.pth', weights_only=True)['args']
    assert (kept['epochs'], kept['mixup_off_epoch']) == (4, 3) and mixed == [True, True, True, False]
    with pytest.raises(ValueError, match='neither is on'):
        run(parse_args(tiny_args(tiny_npz, tmp_path / 'x', '--mixup-off-epoch', '2')))


def test_teacher_amp_runs_the_teacher_in_bf16():
    from timm import create_model
    from titn_lib.train import AutocastTeacher
    teacher = create_model('aircnn_small_32', num_classes=3, in_chans=3).eval()
    x = torch.randn(4, 3, 32, 32)
    seen = []
    teacher.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    logits = AutocastTeacher(teacher)(x)
    assert seen == [torch.bfloat16] and logits.dtype == torch.float32
    assert torch.allclose(logits, teacher(x), atol=0.05)


def test_teacher_amp_warns_where_the_cpu_emulates_bf16(monkeypatch, caplog):
    """A bf16 teacher on a CPU without bf16 kernels is slower than float32: the run says so, and only there."""
    args = parse_args(['--dataset', 'cifar10', '--teacher', 'aircnn_small_32', '--untrained-teacher',
                       '--teacher-amp'])
    info = train_lib.data_lib.DATASETS['cifar10']
    for native, warned in ((True, False), (False, True)):
        caplog.clear()
        monkeypatch.setattr(train_lib, 'cpu_runs_bf16', lambda: native)
        with caplog.at_level(logging.WARNING, logger='titn.train'):
            teacher = train_lib.build_teacher(args, info, torch.device('cpu'))
        assert isinstance(teacher, train_lib.AutocastTeacher)
        assert ('--no-teacher-amp' in caplog.text) == warned
    assert isinstance(train_lib.cpu_runs_bf16(), bool)


def test_initial_checkpoint_pretrained_and_clip_grad(tiny_npz, tmp_path):
    """--initial-checkpoint starts from the given weights; --pretrained from the registered ones (here a file);
    --clip-grad bounds the gradient norm of every step."""
    import timm
    first = tmp_path / 'first'
    run(parse_args(tiny_args(tiny_npz, first, '--epochs', '1', '--no-test', '--threads', '1')))
    start = torch.load(first / 'best.pth', weights_only=True)['model']
    seen = {}
    original = torch.nn.Module.load_state_dict

    def record(module, state, *a, **k):
        seen.setdefault(type(module).__name__, []).append({k_: v.clone() for k_, v in state.items()})
        return original(module, state, *a, **k)

    torch.nn.Module.load_state_dict = record
    try:
        run(parse_args(tiny_args(tiny_npz, tmp_path / 'second', '--epochs', '1', '--no-test', '--threads', '1',
                                 '--initial-checkpoint', str(first / 'best.pth'))))
    finally:
        torch.nn.Module.load_state_dict = original
    loaded = seen['TITN'][0]
    assert all(torch.equal(loaded[k], start[k]) for k in start)

    from safetensors.torch import save_file
    save_file(timm.create_model('titn_tiny_patch8_32', depth=1, num_classes=3).state_dict(),
              str(tmp_path / 'registered.safetensors'))
    args = parse_args(tiny_args(tiny_npz, tmp_path / 'third', '--epochs', '1', '--no-test', '--threads', '1',
                                '--pretrained', '--model-kwargs', 'depth=1',
                                f'pretrained_cfg_overlay={{"file": "{tmp_path / "registered.safetensors"}"}}'))
    args.model_kwargs['pretrained_cfg_overlay'] = dict(file=str(tmp_path / 'registered.safetensors'))
    run(args)

    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *a, **k):
        total = clip(parameters, max_norm, *a, **k)
        norms.append((float(total), max_norm))
        return total

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        run(parse_args(tiny_args(tiny_npz, tmp_path / 'clip', '--epochs', '1', '--no-test', '--threads', '1',
                                 '--clip-grad', '1e-4')))
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    assert norms and all(max_norm == 1e-4 for _, max_norm in norms)
    assert any(total > 1e-4 for total, _ in norms)  # the clip was active


def test_whiten_stem_freeze_bn_scale_and_crop_padding(tiny_npz, tmp_path, monkeypatch):
    """--whiten-stem: the stem starts as the whitening of the training images and stays frozen while the rest
    trains; --freeze-bn-scale: the optimiser never sees a batch-norm scale; --crop-padding reaches both loaders;
    a model without a whitening stem or batch norm is refused before training."""
    from timm import create_model
    from timm.optim import create_optimizer_v2
    from torchvision import transforms as T
    from titn_lib import data as data_lib
    from titn_lib.train import build_data, dataset_info, freeze_batchnorm_scales
    shifts = []
    crop_flip = data_lib.random_crop_flip
    monkeypatch.setattr(data_lib, 'random_crop_flip',
                        lambda x, padding, hflip: shifts.append(padding) or crop_flip(x, padding, hflip))
    args = parse_args(tiny_args(tiny_npz, tmp_path / 'o', '--model', 'aircnn_32', '--model-kwargs',
                                'widths=(8,16,16)', '--whiten-stem', '--freeze-bn-scale', '--crop-padding', '2',
                                '--loader', 'device', '--epochs', '1', '--no-test', '--threads', '1'))
    info = dataset_info(args)
    train_set = build_data(args, info)[0]
    assert [t.padding for t in train_set.dataset.transform.transforms if isinstance(t, T.RandomCrop)] == [2]
    run(args)
    assert shifts and set(shifts) == {2}
    trained = torch.load(tmp_path / 'o' / 'last.pth', weights_only=True)['model']
    start = create_model('aircnn_32', num_classes=3, widths=(8, 16, 16))
    start.init_whitening(data_lib.normalised_images(train_set, 5000, info.mean, info.std, 32, needed_by='test'))
    assert torch.equal(trained['stem.0.weight'], start.stem[0].weight)
    assert not torch.equal(trained['stages.0.conv1.weight'], start.stages[0].conv1.weight)
    assert (trained['stages.0.bn1.weight'] == 1).all() and trained['stages.0.bn1.bias'].any()

    assert freeze_batchnorm_scales(start) == 6
    optimizer = create_optimizer_v2(start, opt='sgd', lr=0.1, weight_decay=5e-4)
    assert sum(p.numel() for g in optimizer.param_groups for p in g['params']) == sum(
        p.numel() for p in start.parameters() if p.requires_grad)
    assert {n for n, p in start.named_parameters() if not p.requires_grad} == {'stem.0.weight'} | {
        f'stages.{i}.bn{j}.weight' for i in range(3) for j in (1, 2)}
    with pytest.raises(ValueError, match='--whiten-stem needs a model with a patch-whitening stem'):
        run(parse_args(tiny_args(tiny_npz, tmp_path / 'x', '--whiten-stem')))
    with pytest.raises(ValueError, match='--freeze-bn-scale: titn_tiny_patch8_32 has no batch-norm'):
        run(parse_args(tiny_args(tiny_npz, tmp_path / 'x', '--freeze-bn-scale')))


@pytest.mark.parametrize('mnist_aug', ['paper', 'crop', 'elastic'])
def test_mnist_aug_reaches_both_loaders(tmp_path, mnist_aug):
    """--mnist-aug picks the MNIST training augmentation of the PIL pipeline and of the device loader alike."""
    from torchvision import transforms as T
    from titn_lib.train import build_data, build_loaders, dataset_info
    from conftest import make_npz_split
    (tmp_path / 'mnist').mkdir()
    make_npz_split(tmp_path / 'mnist' / 'train.npz', 20, num_classes=10, size=28, channels=1)
    args = parse_args(['--dataset', 'mnist', '--data-dir', str(tmp_path), '--output', str(tmp_path / 'o'),
                       '--mnist-aug', mnist_aug, '--loader', 'device', '--val-split', '0.5', '--no-test', *TINY_MODEL])
    info = dataset_info(args)
    train_set, val_set = build_data(args, info)[:2]
    kinds = {type(t) for t in train_set.dataset.transform.transforms}
    assert (T.RandomRotation in kinds) == (mnist_aug != 'crop') and T.RandomCrop in kinds
    assert (T.ElasticTransform in kinds) == (mnist_aug == 'elastic')
    train_loader = build_loaders(args, info, train_set, val_set, torch.device('cpu'), 0, 1)[0](1)
    assert train_loader.mnist_aug == mnist_aug
