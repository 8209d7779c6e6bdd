"""A reward's default weights from the Hugging Face Hub, through huggingface_hub's cache."""

from __future__ import annotations

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
