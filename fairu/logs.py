"""Logging set-up shared by the command-line programs."""

from __future__ import annotations

import logging


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # pika logs every connection step at INFO and each failed attempt as an ERROR
    # with a traceback; fairu logs the outcome itself, once, with the ids involved.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
