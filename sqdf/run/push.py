"""``sqdf push RUN REPO_ID``: a finished run's final/ folder (weights and model card) uploaded
to a Hugging Face Hub model repository with huggingface_hub, the repository made if it does
not exist. Credentials are huggingface_hub's own (``hf auth login`` or ``HF_TOKEN``)."""

from __future__ import annotations

from pathlib import Path

from sqdf.errors import SqdfError
from sqdf.run.folder import read_run_config
from sqdf.run.model_card import CARD, write_model_card
from sqdf.tasks import resolved_reward_name


def push_run(run: str | Path, repo_id: str, *, private: bool | None = None) -> str:
    """Upload ``run``/final to the model repository ``repo_id``; returns the commit's URL. A
    run finished before runs wrote a model card gets one first. A refusal of the Hub (no
    token, no write access, offline, an invalid id) is one SqdfError line."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    # the base of every error its HTTP client raises (a refused connection, a timeout), as
    # huggingface_hub's own errors module names it: whichever client it is built on
    from huggingface_hub.errors import HTTPError as ClientError

    run = Path(run)
    cfg = read_run_config(run)  # a folder that is not a run fails here, in one line
    final = run / "final"
    if not (final / "policy.safetensors").is_file():
        raise SqdfError(
            f"run {run} has no final weights to push; finish it with: sqdf train --resume {run}"
        )
    if not (final / CARD).is_file():
        write_model_card(final, run, cfg, resolved_reward_name(cfg), None)
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(final), repo_id=repo_id, repo_type="model",
            commit_message=f"sqdf run {run.name}",
        )  # fmt: skip
    except (HfHubHTTPError, OfflineModeIsEnabled, ClientError, OSError, RuntimeError,
            ValueError) as err:  # fmt: skip
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SqdfError(
            f"could not push {final} to {repo_id}: {reason} (log in with hf auth login or "
            "set HF_TOKEN; HF_HUB_OFFLINE must be unset)"
        ) from None
    return str(info.commit_url)
