"""`histodiff sweep` with Ray Tune on the tiny models: the synthetic set of every grid scale is made
before the trials, which then only read (two at once here, without deadlocking on 2 cores); the
table and the best config are written, and the best config loads as a config."""

import csv
import io
import json

from histodiff_ray.cli import build_parser
from histodiff_ray.config import load_config
from histodiff_ray.storage import open_location, read_bytes


def test_sweep_writes_trials_and_a_best_config_generate_accepts(tiny_models, tmp_path):
    from histodiff_ray.sweep import sweep

    cfg = load_config(
        "cpu",
        tiny_models["overrides"]
        + [
            "sweep.trials=2",
            "sweep.guidance_scales=0,5,10",
            "sweep.per_class=4",
            "sweep.epochs=2",
            "sweep.grace_epochs=1",
            "sweep.concurrency=2",
            "sampling.ddim_steps=4",
        ],
    )
    out = f"{tiny_models['root']}/sweep"
    result = sweep(cfg, output=out, **tiny_models["args"])
    loc = open_location(out, cfg.storage)
    rows = list(csv.DictReader(io.StringIO(read_bytes(loc.join("trials.csv")).decode())))
    assert len(rows) == 2 and all(not r["error"] for r in rows)
    # Every scale of the grid has its finished set, though two trials can have drawn at most two of them.
    for scale in ("0", "5", "10"):
        assert json.loads(read_bytes(loc.join("synthetic", f"g{scale}", "summary.json")))["tiles"] == 4 * 2
    for r in rows:
        assert float(r["guidance_scale"]) in (0.0, 5.0, 10.0) and 0.5 <= float(r["confidence_threshold"]) <= 0.99
        assert 0.25 <= float(r["synthetic_ratio"]) <= 2.0 and 0 <= float(r["val_macro_f1"]) <= 1
    assert result["best"]["val_macro_f1"] == max(float(r["val_macro_f1"]) for r in rows)
    best_file = tmp_path / "best.yaml"
    best_file.write_bytes(read_bytes(loc.join("best.yaml")))
    best = load_config(str(best_file))
    assert best.sampling.guidance_scale == float(result["best"]["guidance_scale"])
    assert abs(best.selection.confidence_threshold - float(result["best"]["confidence_threshold"])) < 1e-9
    args = build_parser().parse_args(
        [
            "generate",
            "--config",
            str(best_file),
            "--ldm",
            "L",
            "--classifier",
            "C",
            "--judge",
            "J",
            "--tiles",
            "T",
            "--output",
            "O",
        ]
    )
    assert args.config == str(best_file)
