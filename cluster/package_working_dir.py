"""Build the zip that the KubeRay RayJobs use as their Ray ``working_dir``.

    python cluster/package_working_dir.py                      # -> build/histodiff-working-dir.zip
    python cluster/package_working_dir.py /tmp/histodiff.zip
    aws s3 cp build/histodiff-working-dir.zip s3://YOUR_BUCKET/code/histodiff-working-dir.zip

Ray unpacks a remote working_dir zip and, when it holds a single top-level folder, uses that
folder's contents as the job's working directory. So everything goes under one folder
(``histodiff/``): ``jobs/``, ``configs/``, ``histodiff_ray/``, ``pyproject.toml``. ``configs`` is a
symlink in the repository; Python's zipfile (and so Ray) would not recreate it, so the profiles are
stored as plain files. Caches are left out. Only the standard library is used.

With ``ray job submit --working-dir .`` (the AWS cluster, or raycluster.yaml) Ray packages the
working directory itself; this script is only for the RayJobs' remote URI.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP = "histodiff"
INCLUDE = ("jobs", "configs", "histodiff_ray", "pyproject.toml", "README.md")
SKIP_DIRS = {"__pycache__", ".pytest_cache"}
SKIP_SUFFIXES = {".pyc", ".pyo"}


def files_to_pack(repo: Path = REPO) -> list[tuple[Path, str]]:
    """(source file, name inside the zip) for every file that goes into the working dir."""
    out = []
    for name in INCLUDE:
        path = repo / name
        if path.is_file():
            out.append((path, f"{TOP}/{name}"))
            continue
        if not path.is_dir():
            raise SystemExit(f"package_working_dir: {path} is missing")
        root = path.resolve()  # follows the configs -> histodiff_ray/configs symlink
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root)
            if not f.is_file() or SKIP_DIRS.intersection(rel.parts) or f.suffix in SKIP_SUFFIXES:
                continue
            out.append((f, f"{TOP}/{name}/{rel.as_posix()}"))
    return out


def build(output: Path, repo: Path = REPO) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for src, arcname in files_to_pack(repo):
            zf.write(src, arcname)
    tmp.replace(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "output",
        nargs="?",
        default=str(REPO / "build" / "histodiff-working-dir.zip"),
        help="zip to write (default: build/histodiff-working-dir.zip)",
    )
    args = parser.parse_args(argv)
    out = build(Path(args.output))
    with zipfile.ZipFile(out) as zf:
        n = len(zf.namelist())
    print(f"{out}: {n} files under {TOP}/; upload it to the working_dir URI of the RayJobs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
