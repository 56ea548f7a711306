"""Upload a folder to the Hugging Face Hub (`nsn export --push-to-hub REPO`).

Everything goes through huggingface_hub's HfApi (its token lookup, its retries); a
failure is one line naming the repo, and the local export is kept either way.
"""

from __future__ import annotations

from pathlib import Path

from nsn_cli.errors import ModelError, UsageError, first_line


def check_repo_id(repo_id: str) -> None:
    """user/name, checked before anything is written."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")) or any(c.isspace() for c in repo_id):
        raise UsageError(f"--push-to-hub wants a Hub repo id user/name, got {repo_id!r}")


def push_folder(folder: Path, repo_id: str, message: str) -> str:
    """Create `repo_id` if needed and upload `folder` as one commit; return its URL."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    api = HfApi()
    try:
        repo = api.create_repo(repo_id=repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                          commit_message=message)
    except Exception as exc:  # noqa: BLE001 - HTTP, auth, offline: one line, export kept
        first = first_line(exc)
        raise ModelError(f"upload to {repo_id} failed ({first}); the export in {folder} "
                         "is complete, retry with `hf upload`") from None
    return str(getattr(repo, "url", None) or f"https://huggingface.co/{repo_id}")
