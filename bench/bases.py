"""Train (once) and cache the bench's base models; print their accuracy and training time.

    python -m bench.bases [--models cifar_resnet20 cifar_resnet56] [--data npz:PATH]
"""

from __future__ import annotations

import argparse
import json

from bench.common import BASE_EPOCHS, DEFAULT_DATA, base_checkpoint
from widthsearch.training import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(BASE_EPOCHS))
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    for model in args.models:
        ckpt, info = base_checkpoint(model, args.data)
        print(ckpt, json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
