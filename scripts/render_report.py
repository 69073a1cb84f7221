"""Opens evaluate.py's HTML report in headless Chromium, checks that it renders, screenshots it.

    pip install -e '.[browser]'          # playwright; the browser itself comes from elsewhere:
    apt-get install chromium             # (or `playwright install chromium` where its CDN is
                                         #  reachable, then leave out --chromium)
    .venv/bin/python scripts/render_report.py runs/shapes/eval/dit --out=report_dit.png

"Renders" means what a reader would see: the page loads, and every <img> on it finished loading
and decoded to a non-empty picture (`naturalWidth > 0`), which a broken link or a corrupt PNG
fails. Exit status 1 names each image that did not render.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

IMAGES_JS = """() => Array.from(document.images).map(image => ({
    src: image.getAttribute("src"),
    rendered: image.complete && image.naturalWidth > 0,
    width: image.naturalWidth,
    height: image.naturalHeight,
}))"""


def render(report_dir: str, out: str, chromium: str | None, width: int) -> list[dict]:
    """Loads REPORT_DIR/index.html, writes a full-page screenshot to `out`, returns one dict per
    image of the page (src, rendered, width, height)."""
    from playwright.sync_api import sync_playwright

    page_path = os.path.abspath(os.path.join(report_dir, "index.html"))
    if not os.path.isfile(page_path):
        raise SystemExit(f"No {page_path}; pass the --output_dir of an evaluate.py run.")
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium refuses to sandbox when run as root (containers, CI).
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto("file://" + page_path, wait_until="load")
        images = page.evaluate(IMAGES_JS)
        page.screenshot(path=out, full_page=True)
        browser.close()
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_dir", help="an evaluate.py --output_dir holding index.html")
    parser.add_argument("--out", default="report.png", help="screenshot PNG to write")
    parser.add_argument(
        "--chromium",
        default=shutil.which("chromium") or shutil.which("chromium-browser"),
        help="Chromium executable (default: the one on PATH; none: playwright's own)",
    )
    parser.add_argument("--width", type=int, default=1200, help="viewport width in pixels")
    args = parser.parse_args(argv)
    images = render(args.report_dir, args.out, args.chromium, args.width)
    broken = [image["src"] for image in images if not image["rendered"]]
    for image in images:
        state = "ok" if image["rendered"] else "NOT RENDERED"
        print(f"  {state:12s} {image['width']:5d} x {image['height']:<5d} {image['src']}")
    print(f"{len(images) - len(broken)} of {len(images)} images rendered; screenshot: {args.out}")
    if broken:
        print(f"Images that did not render: {broken}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
