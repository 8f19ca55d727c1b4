"""Train (once) and cache the bench's base models; print their accuracy and training time.

    python bench/bases.py [--models cifar_resnet20 cifar_resnet56] [--data npz:PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BASE_EPOCHS, DEFAULT_DATA, base_checkpoint  # noqa: E402

from widthsearch.training import set_threads  # noqa: E402


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
