"""Open a report in a real headless Chromium (Debian's package; `make chromium` installs it), offline, and collect
what a person would see: a screenshot, the images and charts as drawn, the page's text, console errors, and every
request the page made."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_browser():
    """Playwright's API and a Chromium binary, or a skip saying how to get them (a failure under CI, which
    installs both: `make test` runs `make chromium`, and playwright is in the dev extra)."""
    why = None
    if shutil.which(CHROMIUM) is None:
        why = f"no Chromium at {CHROMIUM}: run `make chromium` (apt-get install chromium chromium-driver)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "the playwright package is missing: pip install -e '.[dev]'"
        sync_playwright = None
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {why}")
        pytest.skip(why)
    return sync_playwright


@dataclass
class Rendered:
    screenshot: Path
    text: str
    images: list[dict]  # src prefix, complete, naturalWidth
    charts: list[dict]  # width, height, lines (polyline/circle count)
    requests: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def render(page_path: Path, out_png: Path, tmp: Path, width: int = 1280, full_page: bool = True) -> Rendered:
    """Load ``page_path`` from disk with the network cut off and everything but file:// and data: refused."""
    sync_playwright = require_browser()
    requests, blocked, errors = [], [], []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": width, "height": 1000}, offline=True)
        try:
            def route(r):
                url = r.request.url
                if url.startswith(("file://", "data:")):
                    r.continue_()
                else:
                    blocked.append(url)
                    r.abort()

            context.route("**/*", route)
            page = context.pages[0] if context.pages else context.new_page()
            page.on("request", lambda req: requests.append(req.url))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            page.screenshot(path=str(out_png), full_page=full_page)
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({src: e.src.slice(0, 30), complete: e.complete, width: e.naturalWidth}))")
            charts = page.eval_on_selector_all(
                "svg", "els => els.map(e => {const r = e.getBoundingClientRect(); return {width: r.width, "
                       "height: r.height, lines: e.querySelectorAll('polyline, circle').length}})")
            text = page.inner_text("body")
        finally:
            context.close()
    return Rendered(out_png, text, images, charts, requests, blocked, errors)


def pixel_spread(png: Path) -> float:
    """The standard deviation of the screenshot's grey levels: 0 for a blank page."""
    from PIL import Image, ImageStat

    with Image.open(png) as im:
        return ImageStat.Stat(im.convert("L")).stddev[0]
