"""Parameters and GMACs per image of every registered titn_* variant and teacher (README's variants table).

    python benchmarks/variants.py
"""
import timm
import torch

import titn_lib  # noqa: F401
from titn_lib.evaluate import count_params, gmacs_per_image


def main() -> None:
    print('| name | classes | input | params (M) | GMACs / image |')
    print('|---|---|---|---|---|')
    names = timm.list_models('titn_*') + timm.list_models('aircnn_*')
    for name in names:
        for num_classes in ((10, 100) if name.endswith('_32') else (1000,)):
            model = timm.create_model(name, num_classes=num_classes)
            cfg = model.pretrained_cfg['input_size']
            size = (model.in_chans, *cfg[1:]) if hasattr(model, 'in_chans') else cfg
            with torch.no_grad():
                gmacs = gmacs_per_image(model, size)
            print(f'| {name} | {num_classes} | {"x".join(map(str, size))} | {count_params(model) / 1e6:.3f} | '
                  f'{gmacs:.4f} |')


if __name__ == '__main__':
    main()
