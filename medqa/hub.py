"""The Hugging Face hub, reached at once or not at all: where it cannot be reached, medqa
reads the local cache only, instead of retrying each file five times over a minute."""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

_checked: bool | None = None  # this process's answer: the hub is reachable


def offline_unless_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub is reachable. If not, switch this process to offline mode
    (`HF_HUB_OFFLINE=1`): models and datasets then come from the local cache, and one that
    is not there fails at once with medqa's own message. Asked once a process; behind a
    proxy (`HTTPS_PROXY`) the answer is left to the libraries."""
    global _checked
    if _checked is not None:
        return _checked
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        _checked = not constants.HF_HUB_OFFLINE
        return _checked
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        _checked = True
    except OSError as e:
        _checked = False
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True
        if "datasets" in sys.modules:  # it copied the setting when imported
            import datasets.config

            datasets.config.HF_HUB_OFFLINE = True
        print(f"The Hugging Face hub ({url.hostname}) cannot be reached ({e.strerror or e}): "
              "using the local cache only (HF_HUB_OFFLINE=1).", file=sys.stderr)
    return _checked
