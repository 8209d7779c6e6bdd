"""Where every weight comes from: a local path, or the Hugging Face Hub through huggingface_hub's
cache, and torch pickles read safely."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sqdf.errors import ConfigError


def hub_file(repo: str, filename: str, reward: str) -> str:
    """The local path of ``filename`` in Hub repository ``repo``, downloaded into
    huggingface_hub's cache if it is not there (HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and
    HF_TOKEN as it reads them); a file that cannot be had is one line naming it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo, filename)
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"reward {reward!r}: {filename} of the Hub repository {repo} is not in the Hub "
            "cache and cannot be downloaded (offline, or HF_HUB_OFFLINE=1); download it once "
            "online, or give its local path as a reward parameter"
        ) from None
    except HfHubHTTPError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"reward {reward!r}: {filename} of {repo}: {first}") from None


def read_torch_weights(path: str | Path, reward: str) -> Any:
    """A torch pickle of tensors, read with weights_only=True; a file that is damaged, cut
    short or holds other objects is one line naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged pickle raises anything, EOFError to KeyError
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise ConfigError(
            f"reward {reward!r}: cannot read {path} as a state dict ({first})"
        ) from None
