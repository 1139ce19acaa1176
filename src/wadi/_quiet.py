"""Keep third-party chatter out of wadi's commands; wadi's own tqdm bars stay.

diffusers and transformers draw a progress bar for every model they load or save
("Loading weights", "Writing model shards") and transformers warns that image
processors "require torchvision", which wadi never uses.  Called from
:func:`wadi.cli.main` just before a command runs, so ``wadi --help`` imports nothing.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_libraries"]

_TORCHVISION = "requires torchvision"


class _DropTorchvisionNotice(logging.Filter):
    """Drop the "`XImageProcessor` requires torchvision ... falling back" notices."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _TORCHVISION not in record.getMessage()


def quiet_libraries() -> None:
    """Disable the diffusers/transformers progress bars and the torchvision notices."""
    notice_filter = _DropTorchvisionNotice()
    for name in ("transformers", "transformers.utils.import_utils", "diffusers"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTorchvisionNotice) for f in logger.filters):
            logger.addFilter(notice_filter)
    warnings.filterwarnings("ignore", message=f".*{_TORCHVISION}.*")
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
