"""``python -m services.enabler`` / ``pollen-enabler``."""

from __future__ import annotations

import asyncio

from services.enabler.service import Enabler
from shared.logs import setup_logging
from shared.settings import load_or_exit


def main() -> None:
    settings = load_or_exit()
    setup_logging(settings.log_level, "enabler")
    asyncio.run(Enabler(settings).run())


if __name__ == "__main__":
    main()
