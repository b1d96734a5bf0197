"""Logging for a run: concise lines on the terminal, the same lines with timestamps in the run's log.txt."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm


class _TqdmSafeHandler(logging.StreamHandler):
    """Writes through tqdm so log lines do not break a progress bar that is being drawn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never take the run down
            self.handleError(record)


def setup_logging(run_dir: Path | None, rank: int = 0) -> logging.Logger:
    """Rank 0 logs to the terminal and `log.txt`; rank r > 0 writes `logs/rank<r>.txt` and shows only warnings."""
    logger = logging.getLogger("scan_dist")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = _TqdmSafeHandler()
    console.setFormatter(logging.Formatter("[scan_dist] %(message)s" if rank == 0 else
                                           f"[scan_dist rank {rank}] %(message)s"))
    if rank != 0:
        console.setLevel(logging.WARNING)
    logger.addHandler(console)
    if run_dir is not None:
        path = run_dir / "log.txt" if rank == 0 else run_dir / "logs" / f"rank{rank}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file_handler)
    return logger
