"""The bytes of one shard: a local file, or an HTTP body streamed (never saved) with its own retries."""

from __future__ import annotations

import time

from fillup_data.errors import FillupError
from fillup_data.loader.build import ShardRef


def open_shard(shard: ShardRef, *, retries: int = 3, timeout: float = 60.0):
    """A readable binary stream of one shard: a local file, or an HTTP body streamed (never saved)."""
    if not shard.url.startswith(("http://", "https://")):
        try:
            return open(shard.url, "rb")
        except OSError as err:
            raise FillupError(f"{shard.url}: cannot open shard ({err.strerror}); is the build complete?") from None
    import requests
    from huggingface_hub import constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE:
        raise FillupError(
            f"{shard.url}: HF_HUB_OFFLINE=1 is set, so shard {shard.path} cannot be streamed; unset it, or "
            "download the build (hf download REPO --repo-type dataset --revision REV --local-dir DIR) and "
            "pass DIR as --data"
        )
    last: Exception | None = None
    for attempt in range(retries):
        try:
            # requests drops the Authorization header itself when the Hub redirects to another host (CDN).
            resp = requests.get(shard.url, headers=dict(shard.headers), stream=True, timeout=timeout)
        except requests.RequestException as err:
            last = err
            time.sleep(min(2**attempt, 10))
            continue
        if resp.status_code >= 500 or resp.status_code == 429:
            last = FillupError(f"HTTP {resp.status_code}")
            resp.close()
            time.sleep(min(2**attempt, 10))
            continue
        if resp.status_code != 200:
            resp.close()
            raise FillupError(
                f"{shard.url}: HTTP {resp.status_code} for shard {shard.path}; check the revision and your token"
            )
        resp.raw.decode_content = True
        return resp.raw
    raise FillupError(f"{shard.url}: cannot stream shard {shard.path} after {retries} tries ({last})")
