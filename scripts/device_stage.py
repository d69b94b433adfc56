"""Carry a training split to a machine that reaches nothing outside it, losslessly, within a per-call size limit.

``pack`` (here) writes the images of ``<data-dir>/<dataset>/train.npz`` as lossless WebP sheets of 1,000 images,
spread over ``--parts`` folders so that each travels in its own call (CIFAR-10: two parts of about 40 MiB), plus
a manifest holding the labels and the sha256 of the original arrays. ``unpack`` (there) rebuilds
``<out>/<dataset>/train.npz`` from the folders and refuses anything that is not bit for bit the original.
``pack --jpeg-quality Q`` trades exactness for one call: JPEG sheets without chroma subsampling (CIFAR-10 at
Q 95: one part of about 41 MiB); the manifest then records the PSNR against the original, and ``unpack`` checks
the labels and the shape, and says that the images are lossy.
Procedure and sizes: docs/reproduction.md, "Training on a lent GPU machine".
"""
import argparse
import glob
import hashlib
import json
import os
import sys

import numpy as np
from PIL import Image

SHEET = (10, 100)  # images per sheet: 10 across, 100 down


def _digest(images: np.ndarray, labels: np.ndarray) -> dict:
    return dict(images=hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest(),
                labels=hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest(),
                shape=list(images.shape), dtype=str(images.dtype))


def _to_sheet(block: np.ndarray) -> np.ndarray:
    across, down = SHEET
    n, h, w = block.shape[:3]
    padded = np.zeros((across * down, *block.shape[1:]), block.dtype)
    padded[:n] = block
    grid = padded.reshape(down, across, h, w, -1).transpose(0, 2, 1, 3, 4).reshape(down * h, across * w, -1)
    return grid[..., 0] if grid.shape[-1] == 1 else grid


def _from_sheet(sheet: np.ndarray, h: int, w: int, c: int) -> np.ndarray:
    across, down = SHEET
    sheet = sheet.reshape(down * h, across * w, c)
    return sheet.reshape(down, h, across, w, c).transpose(0, 2, 1, 3, 4).reshape(across * down, h, w, c)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float('inf') if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def pack(args) -> None:
    data = np.load(os.path.join(args.data_dir, args.dataset, 'train.npz'))
    images, labels = data['images'], data['labels']
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        sys.exit(f'pack: expected uint8 images [N, H, W] or [N, H, W, 1 or 3], got {images.dtype} {list(images.shape)}')
    per_sheet = SHEET[0] * SHEET[1]
    sheets = range(0, len(images), per_sheet)
    for part in range(args.parts):
        os.makedirs(os.path.join(args.out, f'part{part}'), exist_ok=True)
    lossy = bool(args.jpeg_quality)
    ext = 'jpg' if lossy else 'webp'
    options = (dict(format='JPEG', quality=args.jpeg_quality, subsampling=0) if lossy else
               dict(format='WEBP', lossless=True, quality=100, method=6))
    rebuilt = []
    for i, start in enumerate(sheets):
        folder = os.path.join(args.out, f'part{i * args.parts // len(sheets)}')
        path = os.path.join(folder, f'{args.dataset}_{i:04d}.{ext}')
        block = images[start:start + per_sheet]
        Image.fromarray(_to_sheet(block)).save(path, **options)
        if lossy:
            rebuilt.append(_read_sheet(path, block.shape)[:len(block)])
    manifest = dict(dataset=args.dataset, label_values=labels.tolist(), label_dtype=str(labels.dtype),
                    sheets=len(sheets), format=ext, **_digest(images, labels))
    if lossy:
        psnr = round(_psnr(np.concatenate(rebuilt), images), 2)
        manifest['lossy'] = dict(jpeg_quality=args.jpeg_quality, psnr_db=psnr)
        print(f'{args.dataset}: JPEG quality {args.jpeg_quality}, 4:4:4: PSNR {psnr} dB')
    with open(os.path.join(args.out, f'part{args.parts - 1}', f'{args.dataset}_manifest.json'), 'w') as f:
        json.dump(manifest, f)
    for part in range(args.parts):
        folder = os.path.join(args.out, f'part{part}')
        size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, '*')))
        print(f'{folder}: {size / 2**20:.1f} MiB')


def _read_sheet(path: str, shape) -> np.ndarray:
    h, w = shape[1:3]
    c = shape[3] if len(shape) == 4 else 1
    return _from_sheet(np.asarray(Image.open(path).convert('L' if c == 1 else 'RGB')), h, w, c)


def unpack(args) -> None:
    manifests = [p for d in args.stage for p in glob.glob(os.path.join(d, f'{args.dataset}_manifest.json'))]
    if len(manifests) != 1:
        sys.exit(f'unpack: expected one {args.dataset}_manifest.json in {args.stage}, found {len(manifests)}')
    with open(manifests[0]) as f:
        manifest = json.load(f)
    ext = manifest.get('format', 'webp')
    files = sorted((p for d in args.stage for p in glob.glob(os.path.join(d, f'{args.dataset}_*.{ext}'))),
                   key=os.path.basename)
    if len(files) != manifest['sheets']:
        sys.exit(f'unpack: expected {manifest["sheets"]} sheets, found {len(files)}: are all parts staged?')
    n = manifest['shape'][0]
    images = np.concatenate([_read_sheet(p, manifest['shape']) for p in files])[:n].reshape(manifest['shape'])
    labels = np.asarray(manifest['label_values'], dtype=manifest['label_dtype'])
    got = _digest(images, labels)
    checked = ('labels', 'shape', 'dtype') if 'lossy' in manifest else tuple(got)
    if any(got[k] != manifest[k] for k in checked):
        sys.exit(f'unpack: the rebuilt {args.dataset} split differs from the original in '
                 f'{[k for k in checked if got[k] != manifest[k]]}')
    os.makedirs(os.path.join(args.out, args.dataset), exist_ok=True)
    np.savez(os.path.join(args.out, args.dataset, 'train.npz'), images=images, labels=labels)
    print(f'{args.dataset}: {n} images rebuilt, ' + (
        f'lossy (JPEG quality {manifest["lossy"]["jpeg_quality"]}, PSNR {manifest["lossy"]["psnr_db"]} dB against the '
        f'original); labels bit for bit (sha256)' if 'lossy' in manifest else 'bit for bit the original (sha256)'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('pack', help='npz -> lossless WebP (or JPEG) sheets in --parts folders')
    p.add_argument('--data-dir', default='../shared/data')
    p.add_argument('--dataset', default='cifar10')
    p.add_argument('--parts', type=int, default=2)
    p.add_argument('--out', default='.stage')
    p.add_argument('--jpeg-quality', type=int, default=0,
                   help='lossy JPEG sheets (4:4:4) of this quality instead of lossless WebP: one call instead of two')
    p.set_defaults(func=pack)
    u = sub.add_parser('unpack', help='sheets -> npz, checked against the sha256 of the original (lossy: the labels)')
    u.add_argument('stage', nargs='+', help='the part folders, in any order')
    u.add_argument('--dataset', default='cifar10')
    u.add_argument('--out', default='/tmp/data')
    u.set_defaults(func=unpack)
    args = parser.parse_args()
    args.func(args)


if __name__ == '__main__':
    main()
