"""What a user sees when something is wrong, through the `titn` console script: one line on stderr saying what was
expected, what was given and what to do, exit status 1, the traceback only with --debug; and every check that can
be made before the first epoch is made there."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch

from conftest import REPO_ROOT, make_npz_split

TINY = ['--dataset', 'npz', '--num-classes', '3', '--workers', '0', '-b', '16', '--epochs', '1', '--opt', 'adamw',
        '--lr', '1e-3', '--no-progress', '--val-split', '0.25', '--model-kwargs', 'depth=1', '--threads', '1']


def titn(*args, cwd=REPO_ROOT):
    """Run the installed console script (``python -m titn_lib.cli`` where it is not on this interpreter's path)."""
    script = os.path.join(os.path.dirname(sys.executable), 'titn')
    command = [script] if os.path.isfile(script) else [sys.executable, '-m', 'titn_lib.cli']
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=600)


def one_line_error(result, *fragments) -> str:
    """The single error line of a failed command, checked for each fragment."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith('titn ')]
    assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def trained_epochs(result) -> int:
    return result.stderr.count('{"epoch": ')


def test_traceback_only_with_debug(tmp_path):
    result = titn('train', *TINY, '--data-dir', tmp_path / 'nowhere', '--output', tmp_path / 'o')
    one_line_error(result, 'no train.npz in', '--debug')
    debug = titn('train', *TINY, '--data-dir', tmp_path / 'nowhere', '--output', tmp_path / 'o', '--debug')
    assert debug.returncode == 1 and 'Traceback' in debug.stderr and 'FileNotFoundError' in debug.stderr


def test_teacher_without_weights_is_refused(tiny_npz, tmp_path):
    result = titn('train', *TINY, '--data-dir', tiny_npz, '--output', tmp_path / 'o', '--teacher', 'aircnn_small_32')
    one_line_error(result, '--teacher aircnn_small_32 has no weights', '--teacher-checkpoint', '--untrained-teacher')
    assert trained_epochs(result) == 0
    on_purpose = titn('train', *TINY, '--data-dir', tiny_npz, '--output', tmp_path / 'o', '--no-test',
                      '--teacher', 'aircnn_small_32', '--untrained-teacher')
    assert on_purpose.returncode == 0, on_purpose.stderr[-2000:]


def test_teacher_checkpoint_names_its_architecture_or_is_refused(tiny_npz, tmp_path):
    import timm
    from safetensors.torch import save_file
    teacher = timm.create_model('aircnn_small_32', num_classes=3, in_chans=3)
    torch.save(dict(model=teacher.state_dict(), arch='aircnn_small_32', model_kwargs={}, num_classes=3),
               tmp_path / 'teacher.pth')
    recorded = titn('train', *TINY, '--data-dir', tiny_npz, '--output', tmp_path / 'o', '--no-test',
                    '--teacher-checkpoint', tmp_path / 'teacher.pth')
    assert recorded.returncode == 0 and 'train_distill' in recorded.stderr, recorded.stderr[-2000:]
    save_file(teacher.state_dict(), str(tmp_path / 'teacher.safetensors'))
    bare = titn('train', *TINY, '--data-dir', tiny_npz, '--output', tmp_path / 'o',
                '--teacher-checkpoint', tmp_path / 'teacher.safetensors')
    one_line_error(bare, 'does not record its architecture', '--teacher')


def test_output_checked_before_the_first_epoch(tiny_npz, tmp_path):
    (tmp_path / 'a_file').write_text('not a folder')
    result = titn('train', *TINY, '--data-dir', tiny_npz, '--output', tmp_path / 'a_file' / 'run')
    one_line_error(result, 'is not writable', 'choose another folder')
    assert trained_epochs(result) == 0


def test_resume_needs_a_training_state(tiny_npz, tmp_path):
    first = titn('train', *TINY, '--data-dir', tiny_npz, '--output', tmp_path / 'o', '--no-test')
    assert first.returncode == 0, first.stderr[-2000:]
    for weights_only in ('best.pth',):
        result = titn('train', *TINY, '--data-dir', tiny_npz, '--output', tmp_path / 'o2',
                      '--resume', tmp_path / 'o' / weights_only)
        one_line_error(result, 'holds weights only', '--initial-checkpoint')
        assert trained_epochs(result) == 0
    state = torch.load(tmp_path / 'o' / 'last.pth', weights_only=True)
    from safetensors.torch import save_file
    save_file(state['model'], str(tmp_path / 'weights.safetensors'))
    one_line_error(titn('train', *TINY, '--data-dir', tiny_npz, '--output', tmp_path / 'o2',
                        '--resume', tmp_path / 'weights.safetensors'), 'holds weights only')
    (tmp_path / 'five').mkdir()
    make_npz_split(tmp_path / 'five' / 'train.npz', 40, num_classes=5)
    other = titn('train', *[a if a != '3' else '5' for a in TINY], '--data-dir', tmp_path / 'five',
                 '--output', tmp_path / 'o', '--resume', 'auto', '--no-test')
    one_line_error(other, 'trained for 3 classes but this run has 5')


def test_full_disk_names_the_file_and_leaves_no_temp_file(tiny_npz, tmp_path):
    """torch.save fails as on a full disk (ENOSPC) once the first checkpoint is being written."""
    out = tmp_path / 'o'
    code = textwrap.dedent(f'''
        import errno, torch
        real_save = torch.save
        def full_disk(obj, f, *args, **kwargs):
            f.write(b'partial')
            raise OSError(errno.ENOSPC, 'No space left on device')
        torch.save = full_disk
        from titn_lib.cli import main
        main(['train', *{[str(a) for a in TINY]!r}, '--data-dir', {str(tiny_npz)!r}, '--output', {str(out)!r}])
    ''')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    line = one_line_error(result, 'no space left on the device', str(out))
    assert 'pth' in line
    assert not [p for p in os.listdir(out) if '.tmp' in p]


def test_stale_temp_files_are_cleaned_at_start(tiny_npz, tmp_path):
    out = tmp_path / 'o'
    out.mkdir()
    stale = out / 'last.pth.tmp99999999'  # a process id that does not run
    stale.write_bytes(b'x' * 1000)
    result = titn('train', *TINY, '--data-dir', tiny_npz, '--output', out, '--no-test')
    assert result.returncode == 0, result.stderr[-2000:]
    assert not stale.exists() and 'removed' in result.stderr


def test_nan_on_a_fresh_run_claims_no_checkpoint(tiny_npz, tmp_path):
    result = titn('train', *TINY, '--data-dir', tiny_npz, '--output', tmp_path / 'o', '--lr', '1e30', '--no-test')
    line = one_line_error(result, 'non-finite in epoch 1', 'no checkpoint had been written yet')
    assert 'was kept' not in line


def test_eval_errors(tiny_npz, tmp_path):
    one_line_error(titn('eval', tmp_path / 'missing.pth', '--data-dir', tiny_npz), 'missing.pth does not exist')
    trained = titn('train', *TINY, '--data-dir', tiny_npz, '--output', tmp_path / 'o', '--no-test')
    assert trained.returncode == 0, trained.stderr[-2000:]
    own = titn('eval', tmp_path / 'o' / 'best.pth', '--data-dir', tiny_npz, '--workers', '0')
    assert own.returncode == 0 and '| titn_tiny_patch8_32 (o) |' in own.stdout, own.stderr[-2000:]  # its own data
    one_line_error(titn('eval', tmp_path / 'o' / 'best.pth', '--dataset', 'mnist', '--data-dir', tiny_npz),
                   'takes 3-channel images and predicts 3 classes, but mnist has 1-channel images and 10 classes',
                   '--dataset npz')


def test_npz_grayscale_column_labels_and_truncated_files(tmp_path):
    gray = tmp_path / 'gray'
    gray.mkdir()
    make_npz_split(gray / 'train.npz', 40, channels=1, size=28)
    with np.load(gray / 'train.npz') as f:
        images, labels = f['images'], f['labels']
    np.savez(gray / 'train.npz', images=images, labels=labels[:, None])  # labels [N, 1]
    result = titn('train', *TINY, '--data-dir', gray, '--output', tmp_path / 'o', '--no-test')
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(tmp_path / 'o' / 'best.pth', weights_only=True)['in_chans'] == 1
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'train.npz').write_bytes((gray / 'train.npz').read_bytes()[:500])
    one_line_error(titn('train', *TINY, '--data-dir', broken, '--output', tmp_path / 'o2'),
                   str(broken / 'train.npz'), 'not a readable .npz')
