"""``python -m services.collector`` / ``pollen-collector``."""

from __future__ import annotations

import signal
from types import FrameType

from services.collector.collector import Collector
from shared.broker import app_or_exit
from shared.logs import setup_logging
from shared.settings import load_or_exit


def main() -> None:
    settings = load_or_exit("pollen-collector")
    app = app_or_exit(settings, "pollen-collector")
    setup_logging(settings.log_level, "collector")
    collector = Collector(settings, app)

    def stop(signum: int, frame: FrameType | None) -> None:
        collector.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    collector.run()


if __name__ == "__main__":
    main()
