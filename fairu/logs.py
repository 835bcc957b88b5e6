"""Logging set-up shared by the command-line programs."""

from __future__ import annotations

import argparse
import logging

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_level_argument(text: str) -> str:
    """Check a --log-level value for argparse, which then prints the error and exits 2."""
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"invalid log level {text!r}: use one of {', '.join(LOG_LEVELS)}"
        )
    return level


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # pika logs every connection step at INFO and each failed attempt as an ERROR
    # with a traceback; fairu logs the outcome itself, once, with the ids involved.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
