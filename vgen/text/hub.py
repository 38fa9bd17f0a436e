"""The local Hugging Face hub cache, and whether the hub can be reached: how vgen finds pretrained
weights offline without waiting on the network (text encoders here, diffusers VAEs in
vgen.codecs.diffusers)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 2.0


def hf_hub_cache_dir(cache_dir: str | None = None) -> Path:
    """The Hugging Face hub cache, resolved now (huggingface_hub reads the variables at import)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_file_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """Repo id and the file names open_clip would try, in its order, for a registry `hf_hub` entry.

    The registry writes 'org/repo/' (default file name) or 'org/repo/file'; open_clip prefers a
    safetensors twin of a pickle name (open_clip.pretrained.download_pretrained_from_hf).
    """
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo_id, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        return repo_id, [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return repo_id, [filename[:-4] + ".safetensors", filename]
    return repo_id, [filename]


def cached_hub_file(repo_id: str, filenames: list[str], cache_dir: Path) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache_dir))
        if isinstance(found, str):  # otherwise None, or a marker that the hub has no such file
            return found
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within `timeout` seconds.

    Run in a daemon thread because name resolution ignores socket timeouts: on a machine without
    DNS it can hang for tens of seconds, and we want an offline machine to fail in seconds.
    """
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="vgen-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def offline() -> bool:
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"):
        return True
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return False  # connections go through the proxy; a direct probe would say nothing
    return not hub_reachable()
