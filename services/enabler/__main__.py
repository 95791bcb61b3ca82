"""``python -m services.enabler`` / ``pollen-enabler``."""

from __future__ import annotations

import asyncio

from services.enabler.service import Enabler
from shared.broker import app_or_exit
from shared.logs import setup_logging
from shared.settings import load_or_exit


def main() -> None:
    settings = load_or_exit("pollen-enabler")
    app = app_or_exit(settings, "pollen-enabler")
    setup_logging(settings.log_level, "enabler")
    asyncio.run(Enabler(settings, app).run())


if __name__ == "__main__":
    main()
