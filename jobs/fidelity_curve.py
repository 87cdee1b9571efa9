"""`histodiff fidelity-curve` as a Ray job (same code as the CLI).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/fidelity_curve.py --config configs/paper.yaml ...

`python jobs/fidelity_curve.py --help` lists the arguments.
"""

import sys

from histodiff_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["fidelity-curve", *sys.argv[1:]]))
