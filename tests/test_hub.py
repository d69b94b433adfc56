"""The real download path (timm -> huggingface_hub -> HTTP) against a loopback Hub, and Hub-layout export.

``HF_ENDPOINT`` must be set before ``huggingface_hub`` is imported, so every download runs in a fresh Python
process started with ``HF_ENDPOINT`` pointing at the loopback server and an isolated ``HF_HOME``.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, SHIPPED_FOLDERS, SHIPPED_WEIGHTS
from hub_server import start_hub_server
from titn_lib.hub import export_checkpoint

ARCH = 'titn_tiny_patch8_32'


def write_train_checkpoint(path, arch=ARCH, num_classes=10, in_chans=1, dataset='mnist', **model_kwargs):
    """A checkpoint as ``titn train`` writes it (random weights)."""
    model = timm.create_model(arch, num_classes=num_classes, in_chans=in_chans, **model_kwargs)
    torch.save(dict(model=model.state_dict(), arch=arch, model_kwargs=model_kwargs, num_classes=num_classes,
                    in_chans=in_chans, img_size=32, mean=[0.1307], std=[0.3081], dataset=dataset, epoch=1), path)
    return model


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    """Repos: the registered MNIST tag (exported here, 2 blocks), a patch-16 export, broken variants."""
    root = tmp_path_factory.mktemp('hub')
    work = tmp_path_factory.mktemp('hub_src')
    write_train_checkpoint(work / 'mnist.pth', depth=2)
    export_checkpoint(str(work / 'mnist.pth'), str(root), 'mnist', metrics={'top1': 50.0},
                      train_command='titn train ...')
    # another class count (100) under the registered 10-class CIFAR-10 name
    write_train_checkpoint(work / 'c100.pth', num_classes=100, in_chans=3, dataset='cifar10', depth=2)
    export_checkpoint(str(work / 'c100.pth'), str(root), 'cifar10')
    # another architecture (outer dim 96) under the registered patch-16 CIFAR-10 name
    write_train_checkpoint(work / 'p16.pth', arch='titn_tiny_patch16_32', in_chans=3, dataset='cifar10', depth=2,
                           embed_dim=96)
    export_checkpoint(str(work / 'p16.pth'), str(root), 'cifar10')
    # a truncated model.safetensors
    truncated = root / f'{ARCH}.cifar100'
    shutil.copytree(root / f'{ARCH}.mnist', truncated)
    data = (truncated / 'model.safetensors').read_bytes()
    (truncated / 'model.safetensors').write_bytes(data[:len(data) // 2])
    # a repo with only a malicious pickle: it must never be unpickled without weights_only
    evil = root / 'titn_tiny_patch16_32.mnist'
    evil.mkdir()

    class Boom:
        def __reduce__(self):
            return (os.system, (f'touch {work}/PWNED',))
    (evil / 'pytorch_model.bin').write_bytes(pickle.dumps({'x': Boom()}))
    # a repo with a config but no weights file at all
    (root / 'no-weights').mkdir()
    shutil.copy(root / f'{ARCH}.mnist' / 'config.json', root / 'no-weights' / 'config.json')
    server, endpoint, requests = start_hub_server(root)
    yield dict(root=root, endpoint=endpoint, requests=requests, work=work)
    server.shutdown()


def run_with_hub(hub, code, hf_home, offline=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_ENDPOINT=hub['endpoint'], HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY='1',
               HF_HUB_DISABLE_XET='1', PYTHONPATH=REPO_ROOT)
    if offline:
        env['HF_HUB_OFFLINE'] = '1'
    prelude = 'import json, torch, timm, titn_lib\n'
    return subprocess.run([sys.executable, '-c', prelude + textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)


def load_error(hub, hf_home, create_call, offline=False):
    """Run ``create_call`` in a fresh process against the loopback Hub; return the PretrainedWeightsError text."""
    code = f'''
        from titn_lib.hub import PretrainedWeightsError
        try:
            {create_call}
        except PretrainedWeightsError as e:
            print("ERROR:", e)
    '''
    result = run_with_hub(hub, code, hf_home, offline=offline)
    assert 'ERROR:' in result.stdout, result.stderr[-3000:]
    return result.stdout


def test_export_writes_hub_layout(hub):
    folder = hub['root'] / f'{ARCH}.mnist'
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == ARCH
    assert config['pretrained_cfg']['input_size'] == [1, 32, 32]
    assert config['pretrained_cfg']['classifier'] == ['head', 'head_dist']
    card = (folder / 'README.md').read_text()
    assert 'titn train ...' in card and 'top-1' in card and 'license' in card.lower()


def test_pretrained_download_cache_and_offline(hub, tmp_path):
    folder = hub['root'] / f'{ARCH}.mnist'
    expected = load_file(str(folder / 'model.safetensors'))
    torch.save(expected, tmp_path / 'expected.pt')
    code = f'''
        m = timm.create_model("{ARCH}.mnist", pretrained=True, depth=2)
        expected = torch.load("{tmp_path / 'expected.pt'}", weights_only=True)
        state = m.state_dict()
        assert set(state) == set(expected)
        assert all(torch.equal(state[k], expected[k]) for k in expected), "tensors differ from the file"
        assert m.in_chans == 1 and m.num_classes == 10
        print("OK")
    '''
    first = run_with_hub(hub, code, tmp_path / 'hf')
    assert first.returncode == 0 and 'OK' in first.stdout, first.stderr[-3000:]
    gets = sum(n for (method, path), n in hub['requests'].items()
               if method == 'GET' and path.endswith(f'{ARCH}.mnist/resolve/main/model.safetensors'))
    assert gets == 1
    second = run_with_hub(hub, code, tmp_path / 'hf')  # from the cache: no second download
    assert second.returncode == 0 and 'OK' in second.stdout, second.stderr[-3000:]
    gets_after = sum(n for (method, path), n in hub['requests'].items()
                     if method == 'GET' and path.endswith(f'{ARCH}.mnist/resolve/main/model.safetensors'))
    assert gets_after == 1
    offline = run_with_hub(hub, code, tmp_path / 'hf', offline=True)
    assert offline.returncode == 0 and 'OK' in offline.stdout, offline.stderr[-3000:]


def test_hf_hub_and_local_dir_names_read_config(hub, tmp_path):
    code = f'''
        m = timm.create_model("hf-hub:titn-lib/{ARCH}.mnist", pretrained=True)
        assert len(m.blocks) == 2 and m.in_chans == 1, (len(m.blocks), m.in_chans)
        n = timm.create_model("local-dir:{hub['root'] / f'{ARCH}.mnist'}", pretrained=True)
        x = torch.randn(1, 1, 32, 32)
        assert torch.equal(m.eval()(x), n.eval()(x))
        print("OK")
    '''
    result = run_with_hub(hub, code, tmp_path / 'hf')
    assert result.returncode == 0 and 'OK' in result.stdout, result.stderr[-3000:]


def hub_id(name):
    """Point a tag without published weights at the loopback repo of that name."""
    return f', pretrained_cfg_overlay=dict(hf_hub_id="titn-lib/{name}")'


@pytest.mark.parametrize('name,kwargs,expected', [
    ('titn_tiny_patch16_32.cifar100', hub_id('no-such-repo'), 'titn-lib/no-such-repo'),  # no such repo
    (f'{ARCH}.cifar100', ', depth=2' + hub_id(f'{ARCH}.cifar100'), 'truncated or corrupt'),
    (f'{ARCH}.cifar10', ', depth=2', 'another architecture or class count'),
    ('titn_tiny_patch16_32.cifar10', ', depth=2' + hub_id('titn_tiny_patch16_32.cifar10'),
     'another architecture or class count'),
    ('titn_tiny_patch16_32.cifar10', '', 'no weights are published for titn_tiny_patch16_32'),
])
def test_clear_errors(hub, tmp_path, name, kwargs, expected):
    out = load_error(hub, tmp_path / 'hf', f'timm.create_model("{name}", pretrained=True{kwargs})')
    assert expected in out
    assert name.split('.')[0] in out or 'titn-lib/' in out
    if 'no weights are published' in out:  # it names the tags that exist, and only those
        assert out.count('titn_tiny_patch8_32.') == len(timm.list_pretrained('titn_*'))


def test_missing_weights_file_error_names_repo(hub, tmp_path):
    out = load_error(hub, tmp_path / 'hf', 'timm.create_model("hf-hub:titn-lib/no-weights", pretrained=True)')
    assert 'titn-lib/no-weights' in out and 'has no model.safetensors' in out


def test_pickle_only_repo_is_refused_not_executed(hub, tmp_path):
    """timm falls back to pytorch_model.bin when a repo has no model.safetensors; it is loaded with
    weights_only=True, so a malicious pickle is refused and never executed."""
    out = load_error(hub, tmp_path / 'hf', 'timm.create_model("titn_tiny_patch16_32.mnist", pretrained=True'
                     + hub_id('titn_tiny_patch16_32.mnist') + ')')
    assert 'titn-lib/titn_tiny_patch16_32.mnist' in out and 'weights_only=True' in out
    assert not (hub['work'] / 'PWNED').exists()


def test_offline_without_cache_is_clear(hub, tmp_path):
    out = load_error(hub, tmp_path / 'empty_home', f'timm.create_model("{ARCH}.mnist", pretrained=True, depth=2)',
                     offline=True)
    assert 'download it once while online' in out
    if f'{ARCH}.mnist' in SHIPPED_FOLDERS:  # the copy in this checkout is named
        assert f'local-dir:{os.path.join(SHIPPED_WEIGHTS, ARCH + ".mnist")}' in out


@pytest.mark.skipif(not SHIPPED_FOLDERS, reason='no weights/ folders in this checkout')
@pytest.mark.parametrize('folder', SHIPPED_FOLDERS)
def test_shipped_weights_load_through_the_hub_protocol(folder, tmp_path):
    """Every folder of weights/ is a Hub repo that `pretrained=True` downloads and loads exactly."""
    server, endpoint, _ = start_hub_server(SHIPPED_WEIGHTS)
    try:
        expected = load_file(os.path.join(SHIPPED_WEIGHTS, folder, 'model.safetensors'))
        torch.save(expected, tmp_path / 'expected.pt')
        with open(os.path.join(SHIPPED_WEIGHTS, folder, 'config.json')) as f:
            in_chans = json.load(f)['pretrained_cfg']['input_size'][0]
        code = f'''
            m = timm.create_model("{folder}", pretrained=True).eval()
            expected = torch.load("{tmp_path / 'expected.pt'}", weights_only=True)
            assert all(torch.equal(m.state_dict()[k], v) for k, v in expected.items())
            assert m(torch.randn(2, {in_chans}, 32, 32)).shape == (2, m.num_classes)
            # timm's test_model_load_pretrained: another channel count and class count, and features out
            other = timm.create_model("{folder}", pretrained=True, in_chans={4 - in_chans}, num_classes=5).eval()
            assert other(torch.randn(1, {4 - in_chans}, 32, 32)).shape == (1, 5)
            features = timm.create_model("{folder}", pretrained=True, num_classes=0).eval()
            assert features(torch.randn(1, {in_chans}, 32, 32)).shape == (1, features.num_features)
            print("OK", m.pretrained_cfg["hf_hub_id"])
        '''
        result = run_with_hub(dict(endpoint=endpoint), code, tmp_path / 'hf')
        assert result.returncode == 0 and f'OK titn-lib/{folder}' in result.stdout, result.stderr[-3000:]
    finally:
        server.shutdown()


def test_model_card_history_is_thinned_to_the_evaluated_epochs():
    from titn_lib.hub import _history_table
    history = [dict(epoch=e, epoch_time_s=60.0, train_loss=1.0, **({'val_top1': e, 'val_top5': 99.0,
                                                                    'val_ema_top1': e + .5} if e % 5 == 0 else {}))
               for e in range(1, 301)]
    rows = _history_table(history, max_rows=30).splitlines()[2:]
    assert len(rows) <= 31 and rows[-1].startswith('| 300 | 300.0 |') and rows[0].startswith('| 5 | 5.0 |')
    assert rows[-1].endswith('| 300.00 | 99.00 | 300.50 |')


def test_config_naming_another_architecture_is_refused(tmp_path):
    """A config.json saying patch 16 over patch-8 weights used to load (patch_pos resampled) and score 33%."""
    from timm.models import save_for_hf
    save_for_hf(timm.create_model(f'{ARCH}.cifar10', depth=1), str(tmp_path), safe_serialization=True)
    config = json.loads((tmp_path / 'config.json').read_text())
    config['architecture'] = 'titn_tiny_patch16_32'
    (tmp_path / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ValueError, match='another patch size'):
        timm.create_model(f'local-dir:{tmp_path}', pretrained=True, depth=1)
    resized = timm.create_model(f'{ARCH}.cifar10', pretrained=True, depth=1, img_size=48,  # a deliberate new size
                                pretrained_cfg_overlay=dict(file=str(tmp_path / 'model.safetensors'), hf_hub_id=None))
    assert resized.patch_pos.shape == (1, 2 + 36, 192)
