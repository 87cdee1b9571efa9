"""Ingest as a Ray job: the same code as `histodiff ingest`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/ingest.py --config configs/cpu.yaml --input s3://raw/crc5 --labeled --output s3://tiles/crc5
"""

import sys

from histodiff_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
