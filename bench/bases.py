"""Train (once) and cache the bench's base models; print their accuracy and training time.

`--keep` copies each base into bench/checkpoints/, which is in git and found before bench/cache/: bench/cache is
not in git, and the same recipe and seed trained again on another CPU give another model (cifar_resnet20: test
0.747, 0.753 and 0.735 on three VMs), whose cells do not pair with those already measured.

    python -m bench.bases [--models cifar_resnet20 cifar_resnet56] [--data npz:PATH] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil

from bench.common import BASE_EPOCHS, DEFAULT_DATA, KEPT, base_checkpoint
from widthsearch.training import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(BASE_EPOCHS))
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="copy each base into bench/checkpoints/ (kept in git)")
    args = parser.parse_args()
    set_threads(args.threads)
    for model in args.models:
        ckpt, info = base_checkpoint(model, args.data)
        if args.keep and ckpt.parent != KEPT:
            KEPT.mkdir(exist_ok=True)
            for path in (ckpt, ckpt.with_suffix(".json")):
                shutil.copy2(path, KEPT / path.name)
            ckpt = KEPT / ckpt.name
        print(ckpt, json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
