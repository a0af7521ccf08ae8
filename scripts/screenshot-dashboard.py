#!/usr/bin/env python3
"""Save a screenshot of the health dashboard, as the README shows it.

    .venv/bin/python scripts/screenshot-dashboard.py http://127.0.0.1:7211/dashboard out.png

Uses Debian's chromium and chromium-driver through Selenium (the `dev` extra), headless, in a
1400x1000 window, once the page has drawn every agent from a finished poll.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selenium.webdriver.support.ui import WebDriverWait

# The browser test's Chromium, so the flags this closed network needs live in one place.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.unit.browser import headless_chromium

# Every tile drawn, and from a real poll: before the first one every agent is "unknown".
DRAWN = """
const tiles = document.querySelectorAll('.tile[data-agent]');
return tiles.length > 0 && ![...tiles].some(t => t.dataset.state === 'unknown');
"""


def screenshot(url: str, out: Path, timeout: float) -> None:
    with headless_chromium() as driver:
        driver.get(url)
        WebDriverWait(driver, timeout).until(
            lambda d: d.execute_script(DRAWN), message=f"{url} drew no agents in {timeout:g}s")
        driver.save_screenshot(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url", help="the dashboard page, e.g. http://127.0.0.1:7211/dashboard")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for the page to draw (default 30)")
    args = parser.parse_args()
    screenshot(args.url, args.out, args.timeout)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
