"""`histodiff train-autoencoder` as a Ray job (same code as the CLI).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train_autoencoder.py --config configs/paper.yaml ...

`python jobs/train_autoencoder.py --help` lists the arguments.
"""

import sys

from histodiff_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-autoencoder", *sys.argv[1:]]))
