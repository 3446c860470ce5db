"""Upload of an export to the Hugging Face hub, behind one small class.

:class:`HubPublisher` wraps ``HfApi.create_repo`` + ``HfApi.upload_folder`` so the choice of upload
API lives in one place and tests can inject a stand-in for the hub API (any object with those two
methods). A failed upload raises :class:`PublishError`, which carries the local path and the exact
commands that retry it; the export on disk is never touched.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class PublishError(RuntimeError):
    """The upload failed; ``folder`` still holds the complete export and ``retry`` says how to resume."""

    def __init__(self, repo_id: str, folder: Path, cause: BaseException, retry: list[str]):
        self.repo_id, self.folder, self.cause, self.retry = repo_id, folder, cause, retry
        lines = [
            f"upload of {folder} to the hub repo {repo_id!r} failed: {type(cause).__name__}: {cause}",
            f"the export is intact at {folder}; nothing there was changed. Retry with:",
            *[f"  {cmd}" for cmd in retry],
        ]
        super().__init__("\n".join(lines))


@dataclass
class PublishResult:
    repo_id: str
    repo_url: str
    commit: Any  # huggingface_hub.CommitInfo (or what the injected API returned)


def retry_commands(folder: Path, repo_id: str, private: bool = False, revision: str | None = None) -> list[str]:
    """The commands that upload ``folder`` again: ours (re-checks the export first) and the hub CLI."""
    ours = ["python", "-m", "videoflash.export", "--upload-only", str(folder), "--push", repo_id]
    cli = ["hf", "upload", repo_id, str(folder), ".", "--repo-type", "model"]
    if private:
        ours.append("--private")
        cli.append("--private")
    if revision:
        ours += ["--revision", revision]
        cli += ["--revision", revision]
    return [shlex.join(ours), shlex.join(cli)]


class HubPublisher:
    """Create (or reuse) a model repo and upload a folder to it.

    Args:
        api: an object with ``create_repo(repo_id, private=..., repo_type=..., exist_ok=...)`` and
            ``upload_folder(repo_id=..., folder_path=..., repo_type=..., commit_message=...,
            revision=...)``; default ``huggingface_hub.HfApi(token=token)``.
        token: a hub token (default: the one ``hf auth login`` stored, or ``HF_TOKEN``).
    """

    def __init__(self, api=None, token: str | None = None):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        self.api = api

    def publish(self, folder, repo_id: str, private: bool = False, revision: str | None = None,
                commit_message: str | None = None) -> PublishResult:
        folder = Path(folder).resolve()
        retry = retry_commands(folder, repo_id, private, revision)
        try:
            url = self.api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            commit = self.api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                repo_type="model",
                commit_message=commit_message or f"Upload {folder.name} (videoflash export)",
                revision=revision,
            )
        except BaseException as exn:  # noqa: BLE001 - any failure (network, auth, Ctrl-C) gets the retry advice
            if isinstance(exn, (SystemExit,)):
                raise
            raise PublishError(repo_id, folder, exn, retry) from exn
        return PublishResult(repo_id, str(url), commit)
