"""Hugging Face Hub paths: `hf://OWNER/REPO[/PATH][@REVISION]` wherever a checkpoint path goes.

A hub path resolves to a local path inside huggingface_hub's cache (`HF_HUB_CACHE`, else
`HF_HOME/hub`, else ~/.cache/huggingface/hub), downloading only what PATH names. With
`HF_HUB_OFFLINE=1` nothing is downloaded: a repository that is not in the cache is a HubError naming
the repository and the variable. The variables are read at each call, not when huggingface_hub is
imported, so a process (or a test) may set them late.

`push` uploads a model directory to a repository (`python -m valle_jax.export --push-to-hub`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from valle_jax.atomic import as_path, is_uri

PREFIX = "hf://"
_PATH = re.compile(r"^hf://(?P<owner>[\w.-]+)/(?P<repo>[\w.-]+)(?P<path>(?:/[^@]+)?)(?:@(?P<rev>[^/@]+))?$")


class HubError(ValueError):
    """A hub path that is malformed, or cannot be had (offline and not cached, not found)."""


@dataclass(frozen=True)
class HubPath:
    repo_id: str  # OWNER/REPO
    path: str  # inside the repository ("" = its root)
    revision: str | None  # branch, tag or commit (None: the default branch)

    def __str__(self) -> str:
        return (
            PREFIX
            + self.repo_id
            + (f"/{self.path}" if self.path else "")
            + (f"@{self.revision}" if self.revision else "")
        )


def is_hub_path(path: str | os.PathLike) -> bool:
    return str(path).startswith(PREFIX)


def parse(path: str) -> HubPath:
    m = _PATH.match(str(path))
    if not m:
        raise HubError(f"{path}: a hub path is hf://OWNER/REPO[/PATH][@REVISION]")
    return HubPath(f"{m['owner']}/{m['repo']}", m["path"].strip("/"), m["rev"])


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """The hub cache huggingface_hub uses, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home) / "hub"


def resolve(path: str | os.PathLike) -> Path:
    """A local path for `path`: itself unless it is a hub path, which is fetched into (or found in) the
    cache; an object-store path (gs://...) stays one, as an etils.epath.Path."""
    if is_uri(path) and not is_hub_path(path):
        return as_path(path)
    if not is_hub_path(path):
        return Path(path)
    hp = parse(str(path))
    patterns = [hp.path, f"{hp.path}/*", f"{hp.path}/**"] if hp.path else None
    try:
        root = huggingface_hub.snapshot_download(
            hp.repo_id,
            revision=hp.revision,
            cache_dir=cache_dir(),
            allow_patterns=patterns,
            local_files_only=offline(),
        )
    except LocalEntryNotFoundError as e:
        if offline():
            raise HubError(
                f"{hp}: the repository {hp.repo_id}{f' (revision {hp.revision})' if hp.revision else ''} is not in "
                f"the hub {cache_dir()} and HF_HUB_OFFLINE is "
                "set, so it cannot be downloaded: unset HF_HUB_OFFLINE (or fetch it once where the hub is reachable)"
            ) from e
        raise HubError(f"{hp}: cannot download {hp.repo_id} ({_first_line(e)})") from e
    except HfHubHTTPError as e:  # repository, revision or file not found, gated, rate limited
        raise HubError(f"{hp}: {_first_line(e)}") from e
    local = Path(root) / hp.path if hp.path else Path(root)
    if not local.exists():
        raise HubError(f"{hp}: {hp.repo_id} (revision {hp.revision or 'default'}) has no {hp.path!r}")
    return local


def conversion_dir(local: Path) -> Path:
    """Where the model converted from a hub file `local` (a path inside the cache) is kept: beside
    the hub cache, keyed by the file's place in it (repository, commit, path), so each is converted once."""
    try:
        rel = local.resolve(strict=False).relative_to(cache_dir().resolve())
    except ValueError:
        rel = Path(local.name)
    return cache_dir().parent / "valle_jax" / "converted" / Path(*[p.replace(".", "_") for p in rel.parts])


def push(model_dir: str | os.PathLike, repo_id: str, private: bool = False, message: str | None = None) -> str:
    """Uploads a model directory to `repo_id` (created if missing); returns the commit's URL."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() and not (model_dir / "lora.json").is_file():
        raise HubError(f"{model_dir} is neither a model directory (config.json) nor a LoRA adapter (lora.json)")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise HubError(f"--push-to-hub {repo_id!r}: expected OWNER/REPO")
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(model_dir), commit_message=message or f"valle_jax model {model_dir.name}"
        )
    except HfHubHTTPError as e:
        raise HubError(f"cannot push {model_dir} to {repo_id}: {_first_line(e)}") from e
    return str(getattr(info, "commit_url", info))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
