"""Where every weight comes from: a local path, or the Hugging Face Hub through huggingface_hub's
cache (HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN as it reads them, with its progress
bars), and torch pickles read safely.

A weight is given as a local path or a Hub reference::

    [hf://]ORG/NAME[@REVISION][/PATH/IN/REPO]

(huggingface_hub's HfFileSystem spelling): a repository, pinned to a commit, branch or tag
after ``@``, optionally one file or subfolder in it. A path that exists on disk always wins;
a reference never holds ``:`` after its optional ``hf://``, so it cannot be read as a
``module:function`` reward. A PATH whose last part has a weight or config suffix
(``.safetensors``, ``.pth``, ``.json`` ...) is one file; any other PATH is a subfolder.

Only what a run loads is fetched: of a diffusers pipeline, the components its family uses
(not the safety checker), of every component its safetensors (not ``.bin``/``.ckpt``
duplicates), in the fp16 variant where the run computes in 16 bits and the repository has
one. Every resolution is recorded (given, repository, revision, commit, files; sha256 of a
single file) for a run's config.json, and a run folder's record pins later loads (resume,
eval, sample, report) to the same commits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sqdf.errors import ConfigError, SqdfError

HUB_PREFIX = "hf://"
# a repository id as the Hub spells it: ORG/NAME of letters, digits, '-', '_' and '.'; a
# revision a branch, tag or commit, or a pull request's or conversion's refs/pr/N, refs/convert/N
# (also URL-quoted, refs%2Fpr%2FN, as the Hub's own links spell it)
_REF = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
    r"(?:@(?P<rev>refs/(?:pr|convert)/\d+|refs%2[Ff](?:pr|convert)%2[Ff]\d+|[^/@\s]+))?"
    r"(?:/(?P<path>[^@\s]+))?"
)
# huggingface_hub's own rules for an id (validate_repo_id): no '--' or '..', no '.git' at the
# end, at most 96 characters; a reference breaking them is refused before any request
_BAD_REPO = re.compile(r"--|\.\.|\.git$|^.{97,}$")
FILE_SUFFIXES = (
    ".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".json", ".txt", ".model", ".yaml", ".npz",
)  # fmt: skip
WEIGHT_SUFFIX = ".safetensors"
# per-folder text files a component loads: configs, tokenizer vocabularies (CLIP's BPE merges,
# T5's sentencepiece model)
CONFIG_SUFFIXES = (".json", ".txt", ".model")
HALF_VARIANT = "fp16"
OPEN_CLIP_PREFIX = "open_clip_"
COMMIT = re.compile(r"[0-9a-f]{40}")


def names_a_file(path: str) -> bool:
    """Whether ``path`` (in a repository, or where a plan would save it) names one file:
    its last part has a weight or config suffix."""
    return path.lower().endswith(FILE_SUFFIXES)


@dataclass(frozen=True)
class HubRef:
    """A Hub reference: repository, revision (None: its default branch), path in it."""

    repo: str
    revision: str | None = None
    path: str | None = None

    @property
    def is_file(self) -> bool:
        return self.path is not None and names_a_file(self.path)

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo}{rev}" + (f"/{self.path}" if self.path else "")

    @property
    def page(self) -> str:
        from huggingface_hub import constants

        return f"{constants.ENDPOINT}/{self.repo}"


def parse_hub_ref(text: str) -> HubRef | None:
    """The Hub reference ``text`` spells, or None where it is not one (a ``module:function``,
    an absolute or home-relative path, anything else)."""
    body = text[len(HUB_PREFIX) :] if text.startswith(HUB_PREFIX) else text
    if ":" in body or body.startswith(("/", "~", ".")):
        return None
    match = _REF.fullmatch(body.rstrip("/"))
    if match is None or _BAD_REPO.search(match["repo"]):
        return None
    path = match["path"]
    if path is not None and any(p in ("", ".", "..") for p in path.split("/")):
        return None
    rev = match["rev"]
    return HubRef(match["repo"], urllib.parse.unquote(rev) if rev else None, path)


def _bad_repo_id(text: str) -> str | None:
    """The repository id in ``text`` where it is spelt like a reference but breaks the Hub's
    rules for an id (``org/a--b``, ``org/x.git``), else None."""
    body = text[len(HUB_PREFIX) :] if text.startswith(HUB_PREFIX) else text
    match = _REF.fullmatch(body.rstrip("/"))
    return match["repo"] if match is not None and _BAD_REPO.search(match["repo"]) else None


# ---- the record of what was resolved, and pins from a run's record -------------------------

_RESOLVED: dict[str, dict[str, Any]] = {}  # given -> how it resolved, in this process
# (repository, path in it) -> (the commit a run recorded, its revision as given then)
_PINS: dict[tuple[str, str | None], tuple[str, str | None]] = {}
# (given, half, configs only, as pinned, Hub cache) -> its local path
_PATHS: dict[tuple[str, bool, bool, str, str], str] = {}


def resolutions() -> dict[str, dict[str, Any]]:
    """Every Hub reference resolved in this process: given -> repository, revision, commit,
    files (and sha256 of a single file), for a run's config.json."""
    return {k: dict(v) for k, v in _RESOLVED.items()}


def pin(recorded: dict[str, dict[str, Any]]) -> None:
    """Load each weight ``recorded`` (a run's config.json "weights") at the commit it resolved
    to then, whatever its branch points at now: resume, eval, sample and report load what the
    run trained on. Pins are by repository and path in it, not by the string given: ``org/name``
    given unpinned finds the run's ``org/name`` at its commit, and a default that a later sqdf
    pins to another commit (CLIP_L14, AESTHETIC_HEAD, HPS_COMMIT ...) loads the run's."""
    for given, rec in recorded.items():
        ref = parse_hub_ref(given)
        if ref is not None and isinstance(rec, dict) and COMMIT.fullmatch(str(rec.get("commit"))):
            rev = rec.get("revision")
            _PINS[(ref.repo, ref.path)] = (str(rec["commit"]), None if rev is None else str(rev))


def _pinned(ref: HubRef) -> HubRef:
    """``ref`` at the commit a run's record pins it to: where the record holds its repository
    and path, and ``ref`` names no revision, the recorded one, or a commit (a default's); a
    branch or tag other than the recorded one is the caller's choice and is kept."""
    found = _PINS.get((ref.repo, ref.path))
    if found is None:
        return ref
    commit, given_rev = found
    if ref.revision in (None, commit, given_rev) or COMMIT.fullmatch(ref.revision or ""):
        if ref.revision not in (None, commit, given_rev):
            print(
                f"sqdf: {ref} loaded at {commit[:12]}, the commit the run recorded",
                file=sys.stderr,
            )
        return HubRef(ref.repo, commit, ref.path)
    return ref


def clear() -> None:
    """Forget the record and the pins (a new run in the same process)."""
    _RESOLVED.clear()
    _PINS.clear()
    _PATHS.clear()


# ---- planning: what a run would download, without downloading it --------------------------

_PLAN: list[dict[str, Any]] | None = None


@contextlib.contextmanager
def planning() -> Iterator[list[dict[str, Any]]]:
    """Within it, resolving a reference fetches only configs (kilobytes, for a model's shapes)
    and lists every weight file it would download or finds cached, with its size from the
    Hub's file metadata or the cache: what ``--dry-run`` shows."""
    global _PLAN
    outer, _PLAN = _PLAN, []
    try:
        yield _PLAN
    finally:
        _PLAN = outer


def planning_now() -> bool:
    """Whether resolution only plans (a dry run): weights are listed, not loaded."""
    return _PLAN is not None


def plan_unreached(given: str, err: OfflineWeightError) -> None:
    """Within a plan, a reference neither cached nor reachable: the plan goes on and lists it
    as not listed; outside a plan, ``err`` is raised."""
    if _PLAN is None:
        raise err
    if not any(entry["given"] == given for entry in _PLAN):  # settings are checked repeatedly
        _PLAN.append({"given": given, "unreached": True})


def plan_text(plan: list[dict[str, Any]]) -> list[str]:
    """Lines for the planned files: per reference, cached and to-download sizes."""
    lines = []
    total = 0
    for entry in plan:
        if "unreached" in entry:
            lines.append(
                f"  {entry['given']}: not listed (not in the Hub cache, and the Hub cannot be "
                "reached)"
            )
            continue
        new = sum(f["size"] or 0 for f in entry["files"] if not f["cached"])
        have = sum(f["size"] or 0 for f in entry["files"] if f["cached"])
        total += new
        lines.append(
            f"  {entry['given']}: {entry['repo']}@{entry['commit'][:12]}, "
            f"{len(entry['files'])} file(s), {human_size(new)} to download, "
            f"{human_size(have)} cached"
        )
    unlisted = sum("unreached" in entry for entry in plan)
    unknown = f", besides the {unlisted} not listed" if unlisted else ""
    lines.append(f"  in all {human_size(total)} to download into {hub_cache()}{unknown}")
    return lines


def human_size(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


# ---- resolution ----------------------------------------------------------------------------


def resolve(given: str, what: str, *, half: bool = False, configs_only: bool = False) -> str:
    """The local path of weight ``given`` (``what`` names it in messages: "task 'sd' model"):
    ``given`` itself where it exists on disk, else the Hub reference's file or folder in the
    Hub cache, downloaded if it is not there (any other string is returned as a local path,
    which the caller checks with its own message). ``half``: the run computes in 16 bits, so a
    component's fp16 variant is taken where the repository has one. ``configs_only``: of a
    folder, its configs and tokenizer files alone (PickScore's processor)."""
    local = Path(given).expanduser()
    if local.exists():
        return str(local)
    _check_not_a_path(given, what)
    if parse_hub_ref(given) is None:
        bad = _bad_repo_id(given)
        if bad is not None:
            raise ConfigError(
                f"{what}: {given!r} is not a valid repository id ({bad!r}: no '--' or '..', "
                "no '.git' at its end, at most 96 characters)"
            )
        return str(local)  # a local path that is not there: its user says what it should be
    ref = parse_hub_ref(given)
    if ref is None:  # checked just above
        raise ConfigError(f"{what}: {given!r} is not a Hub reference")
    pinned = _pinned(ref)
    key = (given, half, configs_only, str(pinned), hub_cache())
    if _PLAN is None and key in _PATHS and Path(_PATHS[key]).exists():
        return _PATHS[key]  # a config is checked more than once; the Hub is asked once
    try:
        with _one_line(pinned, what):
            path = (
                _resolve_file(given, pinned)
                if pinned.is_file
                else _resolve_folder(given, pinned, half, configs_only)
            )
    except OfflineWeightError as err:
        err.given = given  # what a plan lists it by
        raise
    if _PLAN is None:
        _PATHS[key] = path
        record = _RESOLVED[given]
        record["revision"] = ref.revision  # as given; its commit pins it
        if pinned != ref:
            record["pinned_by"] = "the run's config.json"
    return path


def _check_not_a_path(given: str, what: str) -> None:
    """One line, before any request, for a string that is not a model repository: a missing
    local path spelt like ORG/NAME (its first part is a folder here: ``runs/sd/final`` with a
    typo is not sent to the Hub as repository ``runs/sd``; ``hf://`` forces the Hub), and a
    Hub dataset or Space (``datasets/...``, ``spaces/...``), which hold no sqdf weights."""
    hub = given.startswith(HUB_PREFIX)
    body = given[len(HUB_PREFIX) :] if hub else given
    first = body.split("/")[0]
    if not hub and "/" in body and first not in ("", ".", "..") and Path(first).is_dir():
        raise ConfigError(
            f"{what}: local path not found: {given} ({first}/ is a folder here, so this is "
            f"read as a path; write hf://{given} for a Hub repository)"
        )
    if first in ("datasets", "spaces") and body.count("/") >= 2:
        raise ConfigError(
            f"{what}: {given} names a Hub {first[:-1]}; weights come from model repositories "
            "(ORG/NAME)"
        )


def resolve_optional(given: str | None, what: str, *, half: bool = False) -> str | None:
    return None if given in (None, "") else resolve(str(given), what, half=half)


def _hub() -> Any:
    import huggingface_hub
    import huggingface_hub.errors  # noqa: F401  (hub.errors below)

    return huggingface_hub


def _resolve_file(given: str, ref: HubRef) -> str:
    hub = _hub()
    assert ref.path is not None
    if _PLAN is not None:
        # offline this is what the cache holds (huggingface_hub answers a dry run from it)
        info = hub.hf_hub_download(ref.repo, ref.path, revision=ref.revision, dry_run=True)
        _planned(given, ref, info.commit_hash, [info])
        return info.local_path
    path = hub.hf_hub_download(ref.repo, ref.path, revision=ref.revision)
    commit = Path(path).parent.name if ref.path.count("/") == 0 else _commit_of(path, ref.path)
    _RESOLVED[given] = {
        "repo": ref.repo, "revision": ref.revision, "commit": commit, "files": [ref.path],
        "sha256": verified_sha256(path, str(ref)),
    }  # fmt: skip
    return path


def _commit_of(path: str, inner: str) -> str:
    folder = Path(path)
    for _ in inner.split("/"):
        folder = folder.parent
    return folder.name


def _resolve_folder(given: str, ref: HubRef, half: bool, configs_only: bool = False) -> str:
    hub = _hub()
    fallback: BaseException | None = None
    if _PLAN is None and ref.revision is not None and COMMIT.fullmatch(ref.revision):
        commit, listing = _cached_listing(ref, required=False)
        if listing and not _missing(ref, commit, listing, half, configs_only)[1]:
            fallback = _PinnedInCache()  # a commit whose files are all here: no request at all
    if fallback is None:
        try:
            commit, listing = _hub_listing(ref)
        except _Unreachable as err:
            fallback = err.cause
            commit, listing = _cached_listing(ref, required=False)
            if not listing:
                raise (_offline_error(ref) if _offline(fallback) else fallback) from None
    files, missing = _missing(ref, commit, listing, half, configs_only)
    if fallback is not None and missing and _PLAN is None:
        if not _offline(fallback):
            raise fallback  # the Hub's own answer (a 503, a 429): one line in _one_line
        raise OfflineWeightError(
            f"{ref} is only partly in the Hub cache ({hub_cache()}; no {missing[0]}) and the "
            "Hub cannot be reached (HF_HUB_OFFLINE=1, or no network): run once online to "
            "finish the download, or give a local path"
        )
    sub = ref.path or ""
    snapshot = _snapshot(ref, commit)
    if _PLAN is not None:
        configs = [f for f in files if f.endswith(CONFIG_SUFFIXES)]
        folder = hub.snapshot_download(ref.repo, revision=commit, allow_patterns=configs)
        try:
            if fallback is not None:
                raise hub.errors.DryRunError("the Hub is not reachable")
            infos = hub.snapshot_download(
                ref.repo, revision=commit, allow_patterns=_literal(files), dry_run=True,
                tqdm_class=_quiet_tqdm(),
            )  # fmt: skip
        except hub.errors.DryRunError:  # offline: the plan is what the cache holds
            infos = [_Cached(f, listing.get(f)) for f in files]
        _planned(given, ref, commit, infos)
    else:
        if fallback is not None:
            folder = str(snapshot)  # every file is in the cache: the Hub is not asked again
        else:
            folder = hub.snapshot_download(
                ref.repo, revision=commit, allow_patterns=_literal(files)
            )
        _RESOLVED[given] = {
            "repo": ref.repo, "revision": ref.revision, "commit": commit, "files": files,
            # the weights variant taken (fp16 where the run computes in 16 bits and it exists)
            "variant": HALF_VARIANT if any(_variant(f) == HALF_VARIANT for f in files) else None,
        }  # fmt: skip
    return str(Path(folder) / sub) if sub else str(folder)


class _PinnedInCache(Exception):
    """Not an error: a commit-pinned folder found complete in the cache."""


class _Unreachable(Exception):
    """The Hub did not list a repository for a reason the cache may stand in for (offline,
    no network, a 5xx or 429); ``cause`` is huggingface_hub's error."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def _offline(err: BaseException | None) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    return isinstance(err, (OfflineModeIsEnabled, _PinnedInCache)) or _transport(err)


def _missing(
    ref: HubRef, commit: str, listing: dict[str, int], half: bool, configs_only: bool
) -> tuple[list[str], list[str]]:
    """The files of ``ref``'s folder a run loads (from ``listing``), and what the cache's
    snapshot of ``commit`` lacks of them: those files, and where the listing came from the cache
    itself, the weights a model folder there needs (a folder with config.json holds
    safetensors; a sharded index names only shards that are there; every pipeline component
    has its folder) - a dry run's configs-only download or a killed one leaves them out."""
    sub = ref.path or ""
    inside = {p[len(sub) + 1 :] if sub else p: s for p, s in listing.items()
              if not sub or p.startswith(sub + "/")}  # fmt: skip
    if not inside:
        raise ConfigError(f"{ref} has no folder {sub!r} at commit {commit[:12]}")
    snapshot = _snapshot(ref, commit)
    base = snapshot / sub if sub else snapshot
    folders = [""]
    if "model_index.json" in inside:
        index = json.loads(_read_config(ref, commit, _join(sub, "model_index.json")))
        chosen = pipeline_files(inside, index, half)
        folders = [
            name for name, entry in index.items()
            if not name.startswith("_") and name not in UNUSED_COMPONENTS
            and isinstance(entry, list) and entry and entry[-1] is not None
        ]  # fmt: skip
    else:
        chosen = folder_files(inside, half)
    if configs_only:
        chosen = [f for f in chosen if f.endswith(CONFIG_SUFFIXES)]
    missing = [f for f in chosen if not (base / f).is_file()]
    if not configs_only:
        for folder in folders:
            mine = [f for f in chosen if (f.rsplit("/", 1)[0] if "/" in f else "") == folder]
            if not mine:
                missing.append(f"{folder}/" if folder else "weights")
            elif _join(folder, "config.json") in mine and not any(
                f.endswith(WEIGHT_SUFFIX) for f in mine
            ):
                missing.append(_join(folder, f"*{WEIGHT_SUFFIX}"))
            for index_file in (f for f in mine if ".safetensors.index." in f):
                if (base / index_file).is_file():
                    shards = json.loads((base / index_file).read_text()).get("weight_map", {})
                    missing += [
                        _join(folder, s) for s in sorted(set(shards.values()))
                        if not (base / _join(folder, s)).is_file()
                    ]  # fmt: skip
    return sorted(_join(sub, f) for f in chosen), missing


def _snapshot(ref: HubRef, commit: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(hub_cache()) / repo_folder_name(repo_id=ref.repo, repo_type="model")
    return storage / "snapshots" / (commit or "-")


def _read_config(ref: HubRef, commit: str, name: str) -> str:
    """A small file of ``ref`` at ``commit``: from the cache where it is there (no request),
    else downloaded."""
    cached = _snapshot(ref, commit) / name
    if cached.is_file():
        return cached.read_text()
    return Path(_hub().hf_hub_download(ref.repo, name, revision=commit)).read_text()


@dataclass(frozen=True)
class _Cached:
    """A planned file found in the cache offline (huggingface_hub's DryRunFileInfo's fields
    that a plan reads)."""

    filename: str
    file_size: int | None
    commit_hash: str = ""
    local_path: str = ""
    is_cached: bool = True


def _join(sub: str, name: str) -> str:
    return f"{sub}/{name}" if sub else name


def _literal(files: list[str]) -> list[str]:
    """fnmatch patterns matching exactly these names ([ is fnmatch's only special we meet)."""
    return [re.sub(r"([\[\]*?])", r"[\1]", f) for f in files]


def _planned(given: str, ref: HubRef, commit: str, infos: list[Any]) -> None:
    assert _PLAN is not None
    if any(entry["given"] == given for entry in _PLAN):
        return  # a config checked twice lists its weights once
    _PLAN.append({
        "given": given, "repo": ref.repo, "commit": commit,
        "files": [{"name": i.filename, "size": i.file_size, "cached": i.is_cached} for i in infos],
    })  # fmt: skip


def _hub_listing(ref: HubRef) -> tuple[str, dict[str, int]]:
    """The commit ``ref`` resolves to and its files with their sizes, in one request to the
    Hub; ``_Unreachable`` where the cache may stand in (offline, no network, a 5xx or 429),
    huggingface_hub's error where it may not (gated, not found, 401, 403)."""
    from huggingface_hub import HfApi, constants, errors

    if constants.HF_HUB_OFFLINE:
        raise _Unreachable(errors.OfflineModeIsEnabled("HF_HUB_OFFLINE=1"))
    try:
        info = HfApi().model_info(
            ref.repo, revision=ref.revision or constants.DEFAULT_REVISION, files_metadata=True
        )
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError):
        raise
    except errors.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise
        raise _Unreachable(err) from None
    except Exception as err:
        if _transport(err) or isinstance(err, errors.OfflineModeIsEnabled):
            raise _Unreachable(err) from None
        raise
    commit = str(info.sha)
    _remember_revision(ref, commit)
    return commit, {s.rfilename: s.size or 0 for s in info.siblings or []}


def _remember_revision(ref: HubRef, commit: str) -> None:
    """Write the cache's refs/REVISION -> commit as huggingface_hub's own downloads do, so
    that offline the revision finds its snapshot (a download by commit writes none)."""
    from huggingface_hub.file_download import repo_folder_name

    revision = ref.revision or "main"
    if revision == commit:
        return
    path = Path(hub_cache()) / repo_folder_name(repo_id=ref.repo, repo_type="model") / "refs"
    path = path / revision
    if path.is_file() and path.read_text().strip() == commit:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, path)


def _quiet_tqdm() -> type:
    """A progress bar that shows nothing: listing a repository is not a download (the
    downloads keep huggingface_hub's own bars)."""
    from tqdm.auto import tqdm

    class Quiet(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def _transport(err: BaseException | None) -> bool:
    """A network failure below HTTP (httpx's TransportError: a refused or dropped connection, a
    timeout, a proxy's refusal), from whichever httpx huggingface_hub uses."""
    for module in ("httpx2", "httpx"):
        try:
            base = __import__(module).TransportError
        except (ImportError, AttributeError):
            continue
        if isinstance(err, base):
            return True
    return False


def _cached_listing(ref: HubRef, required: bool = True) -> tuple[str, dict[str, int]]:
    """The commit ``ref``'s revision points at in the cache and the files its snapshot holds
    (none, or the offline error where ``required``, if the cache has no snapshot of it)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=ref.repo, repo_type="model")
    revision = ref.revision or "main"
    commit = revision if COMMIT.fullmatch(revision) else None
    refs = storage / "refs" / revision
    if commit is None and refs.is_file():
        commit = refs.read_text().strip()
    snapshot = storage / "snapshots" / (commit or "-")
    if commit is None or not snapshot.is_dir():
        if required:
            raise _offline_error(ref)
        return commit or "", {}
    files = {
        p.relative_to(snapshot).as_posix(): p.stat().st_size
        for p in snapshot.rglob("*")
        if p.is_file()
    }
    return commit, files


def _offline_error(ref: HubRef) -> ConfigError:
    return OfflineWeightError(
        f"{ref} is not in the Hub cache ({hub_cache()}) and the Hub cannot be reached "
        "(HF_HUB_OFFLINE=1, or no network): run once online, or give a local path"
    )


# ---- which files of a folder a run loads ---------------------------------------------------


def _variant(name: str) -> str | None:
    """The diffusers/transformers variant of a weight file name: model.fp16.safetensors,
    diffusion_pytorch_model.fp16-00001-of-00002.safetensors -> fp16; model.safetensors or
    model-00001-of-00002.safetensors -> None."""
    parts = name.split(".")
    if len(parts) < 3:
        return None
    return re.sub(r"-\d+-of-\d+$", "", parts[-2])


def weights_variant(folder: str | Path) -> str | None:
    """The variant of the safetensors weights in ``folder`` that from_pretrained must be told:
    None where plain ones are there (or none at all), else the one there is."""
    names = [p.name for p in Path(folder).glob(f"*{WEIGHT_SUFFIX}")]
    variants = {_variant(n) for n in names}
    if not variants or None in variants:
        return None
    return HALF_VARIANT if HALF_VARIANT in variants else sorted(variants)[0]


def _index_variant(name: str) -> str | None:
    """X.safetensors.index.json -> None; X.safetensors.index.fp16.json -> fp16."""
    head, _, tail = name.partition(".safetensors.index.")
    return None if tail == "json" else tail.removesuffix(".json")


def folder_files(files: dict[str, int], half: bool) -> list[str]:
    """Of a model folder's files (relative names, one folder deep counted as its own), the
    configs and tokenizer files, and the safetensors weights of one variant: fp16 where
    ``half`` and the folder has it, else the plain one (else the one there is)."""
    # open_clip's own checkpoint and config beside the transformers ones (laion/CLIP-ViT-H-14
    # holds a 3.9 GB open_clip_model.safetensors) are another library's copy of the same model
    names = [f for f in files if "/" not in f and not f.startswith(OPEN_CLIP_PREFIX)]
    weights = [f for f in names if f.endswith(WEIGHT_SUFFIX)]
    variants = {_variant(f) for f in weights}
    if half and HALF_VARIANT in variants:
        variant = HALF_VARIANT
    elif None in variants or not variants:
        variant = None
    else:
        variant = sorted(v for v in variants if v is not None)[0]
    chosen = [f for f in weights if _variant(f) == variant]
    for f in names:
        if ".safetensors.index." in f:
            if _index_variant(f) == variant:
                chosen.append(f)
        elif f.endswith(CONFIG_SUFFIXES) and not f.endswith(".bin.index.json"):
            chosen.append(f)
    return sorted(chosen)


# the subfolders a diffusers pipeline repository holds that no sqdf run loads
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def pipeline_files(files: dict[str, int], index: dict[str, Any], half: bool) -> list[str]:
    """Of a diffusers pipeline's files: model_index.json and, for each component it names
    (the safety checker, feature extractor and image encoder left out), ``folder_files`` of
    its subfolder."""
    chosen = ["model_index.json"]
    for name, entry in index.items():
        if name.startswith("_") or name in UNUSED_COMPONENTS:
            continue
        if not (isinstance(entry, list) and entry and entry[-1] is not None):
            continue
        inside = {f[len(name) + 1 :]: s for f, s in files.items() if f.startswith(name + "/")}
        chosen += [f"{name}/{f}" for f in folder_files(inside, half)]
    return chosen


# ---- one line for each way a download fails -------------------------------------------------


@contextlib.contextmanager
def _one_line(ref: HubRef, what: str) -> Iterator[None]:
    from huggingface_hub import errors

    try:
        yield
    except SqdfError as err:
        raise type(err)(f"{what}: {err}") from None
    except errors.GatedRepoError:
        raise GatedWeightError(
            f"{what}: {ref.repo} is a gated repository and this machine's token has no access: "
            f"accept its licence at {ref.page}, then log in (hf auth login) or set HF_TOKEN"
        ) from None
    except errors.RevisionNotFoundError:
        raise MissingWeightError(
            f"{what}: {ref.repo} has no revision {ref.revision!r} on the Hub"
        ) from None
    except errors.LocalEntryNotFoundError:
        raise OfflineWeightError(f"{what}: {_offline_error(ref)}") from None
    except errors.EntryNotFoundError:
        raise MissingWeightError(
            f"{what}: {ref.repo} has no file {ref.path!r} at {ref.revision or 'main'}"
        ) from None
    except errors.RepositoryNotFoundError:
        raise MissingWeightError(
            f"{what}: no Hub repository {ref.repo} (or it is private: log in with hf auth "
            "login or set HF_TOKEN)"
        ) from None
    except errors.HfHubHTTPError as err:
        first = str(err).strip().splitlines()[0]
        raise MissingWeightError(f"{what}: {ref}: {first}") from None
    except errors.HFValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"{what}: {ref} is not a valid repository id ({first})") from None
    except OSError as err:  # a full disk, an unwritable cache
        raise SqdfError(f"{what}: cannot download {ref} into {hub_cache()}: {err}") from None
    except Exception as err:
        if not _transport(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SqdfError(
            f"{what}: download of {ref} interrupted ({type(err).__name__}: {first}) after "
            "huggingface_hub's retries: run again (the files that finished are kept)"
        ) from None


class GatedWeightError(ConfigError):
    """A gated Hub repository this machine's token cannot read."""


class MissingWeightError(ConfigError):
    """A Hub repository, revision or file that does not exist."""


class OfflineWeightError(ConfigError):
    """A Hub weight neither cached nor downloadable (offline). ``given``: the reference as
    it was given to :func:`resolve`, so that a plan can list it as not listed."""

    given: str | None = None


# ---- single files: checksums, torch pickles, their safetensors conversion -------------------


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sqdf_cache() -> Path:
    """sqdf's own cache (converted weights): $SQDF_CACHE, else sqdf/ beside the Hub cache
    under HF_HOME."""
    from huggingface_hub import constants

    return Path(os.environ.get("SQDF_CACHE") or Path(constants.HF_HOME) / "sqdf")


def as_safetensors(
    path: str | Path, convert: Callable[[Path, Path], Any], what: str, given: str | None = None
) -> str:
    """``path`` itself if it is safetensors; a torch pickle (.pth/.pt) converted once by
    ``convert(source, out)`` into sqdf's cache, named by the pickle's sha256 (checked against
    the Hub's where it came from there), and read from there afterwards."""
    path = Path(path)
    if path.suffix == WEIGHT_SUFFIX or _PLAN is not None:
        return str(path)
    digest = verified_sha256(path, what)
    out = sqdf_cache() / "converted" / f"{digest}.safetensors"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            convert(path, tmp)
            os.replace(tmp, out)  # a half-written conversion is never read
        finally:
            tmp.unlink(missing_ok=True)
    return str(out)


def verified_sha256(path: str | Path, what: str) -> str:
    """The sha256 of ``path``, checked against the Hub's where it is a cached LFS file (a
    mismatch is one line: a damaged or altered download). Hashed once per file content: the
    digest is remembered in sqdf's cache keyed by the file's blob name, size and modification
    time, so a 2 GB checkpoint is not read again on every load, and a file changed in place is
    hashed (and refused) again."""
    path = Path(path)
    real = path.resolve()
    stat = real.stat()
    note = sqdf_cache() / "sha256" / f"{real.name}.json"
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        known = json.loads(note.read_text())
        if {k: known.get(k) for k in stamp} == stamp and re.fullmatch(
            r"[0-9a-f]{64}", str(known.get("sha256"))
        ):
            return str(known["sha256"])
    except (OSError, ValueError):
        pass  # not hashed yet, or a torn note: hash again
    digest = sha256_of(real)
    expected = _hub_sha256(path)
    if expected is not None and expected != digest:
        raise ConfigError(
            f"{what}: {path} has sha256 {digest}, the Hub's file {expected}: a damaged or "
            "altered download; delete it from the Hub cache and run again"
        )
    with contextlib.suppress(OSError):  # a read-only cache only costs the next hash
        note.parent.mkdir(parents=True, exist_ok=True)
        tmp = note.with_name(f".{note.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**stamp, "sha256": digest}))
        os.replace(tmp, note)
    return digest


def _hub_sha256(path: Path) -> str | None:
    """The sha256 the Hub gave for a cached LFS file: the name of the blob its snapshot entry
    links to (huggingface_hub names LFS blobs by their sha256)."""
    if not path.is_symlink():
        return None
    blob = Path(os.readlink(path)).name
    return blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None


def hub_file(repo: str, filename: str, reward: str) -> str:
    """The local path of ``filename`` in Hub repository ``repo`` (a reward's default file)."""
    return resolve(f"{repo}/{filename}", f"reward {reward!r}")


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
