"""Keep third-party progress bars and load reports out of legend's output (the CLI and the Flower apps)."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Flower's per-request lines
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecations PEFT triggers inside transformers
