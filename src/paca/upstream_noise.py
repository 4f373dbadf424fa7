"""Third-party log lines known to carry nothing for a paca user, dropped before they print on every command.

Only exact, understood cases are filtered; anything else a dependency logs still shows.
"""

from __future__ import annotations

import logging


class _MissingKernelsPackage(logging.Filter):
    """bitsandbytes >= 0.50 on a CPU with AVX512-BF16 tries a hub kernel through the optional ``kernels`` package at
    import and logs a warning when it cannot have it: the package is missing, or (kernels >= 0.19, which transformers
    5.25 installs) the hub repository is not on its trust allowlist, or the hub is offline and the kernel not cached.
    It then uses its own CPU kernel, which is what paca's tests run. The warning is dropped only for those causes."""

    CAUSES = (
        "No module named 'kernels'",
        "could not verify publisher trust status",
        "is not available in the local cache and Hugging Face Hub is in offline mode",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
            and any(cause in message for cause in self.CAUSES)
        )


def install_filters() -> None:
    """Attach the filters (idempotent); call before anything imports bitsandbytes."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _MissingKernelsPackage) for f in logger.filters):
        logger.addFilter(_MissingKernelsPackage())
