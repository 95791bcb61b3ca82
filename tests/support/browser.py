"""The browser the dashboard and security tests drive: Debian's Chromium (Playwright)."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("POLLEN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_executable() -> str:
    found = shutil.which(CHROMIUM) or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if found is None:
        pytest.fail(
            f"Chromium is not installed ({CHROMIUM} not found): run .ci/run, or "
            "`apt-get install chromium` (Debian's package), then run the tests again"
        )
    return found
