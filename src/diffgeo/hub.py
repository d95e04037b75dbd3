"""Resolving Hugging Face Hub ids: the one place that talks to the Hub, with one error message."""

from __future__ import annotations

import os
from pathlib import Path

from diffgeo.errors import ModelNotFoundError


def looks_like_path(name: str) -> bool:
    """'owner/name' or a bare 'name' is a hub id; anything path-like ('./x', '/x', '~/x',
    'a/b/c') is a local folder, so a typo in a path is reported as a missing folder."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def snapshot(repo_id: str, patterns: list[str], what: str = "model",
             example: str = "--model ./my-model") -> Path:
    """Download (or find in the cache) only the files matching ``patterns``.

    Every failure — offline, unknown id, gated repo, network — becomes a ModelNotFoundError
    naming the id, the local-folder alternative and HF_HUB_OFFLINE.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # every hub failure becomes one actionable message
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise ModelNotFoundError(
            f"could not load {what} {repo_id!r}: it is not a local folder, and "
            + ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
               if offline else "the Hugging Face Hub could not provide it")
            + f" ({type(e).__name__}). Either download it where the Hub is reachable (it is then "
            "cached), or pass the path of a local folder saved with save_pretrained, e.g. "
            f"{example}. Set HF_HUB_OFFLINE=1 to use only the local cache without network "
            "access."
        ) from None
