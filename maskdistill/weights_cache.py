"""Hub weights: which ones a config needs, one cache folder that holds them, and fetching them
before any model job (GPU nodes often cannot reach the internet).

A ViT setting with ``pretrained: true`` and no ``checkpoint`` names weights on the timm hub (a
Hugging Face hub repository, or a URL for timm entries without one), unless its timm entry points
to a local file (the shipped demo ViT). :func:`fetch_weights` puts each into the ``weights_cache``
folder (the workflow's local rule ``fetch_weights``, run where Snakemake runs) and returns a
manifest that lists the files; model jobs load the file the manifest names (:func:`manifest_file`)
and never touch the network. A weight that is neither cached nor reachable is one error naming its
config key, the hub name and the two ways out.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from maskdistill.backbone import check_vit_name  # importing it registers the package's own ViTs
from maskdistill.settings import Settings, VitSettings
from maskdistill.storage import atomic_path, read_json

# The ViT settings whose weights a run loads (patch_kmeans uses the mining ViT).
VIT_KEYS = ("mining.backbone", "clustering.backbone")
REACH_TIMEOUT_S = 10.0  # one attempt to reach a host; no retries
_SAFE_NAME, _BIN_NAME = "model.safetensors", "pytorch_model.bin"


class WeightsUnavailable(RuntimeError):
    """Hub weights that are neither in the cache nor downloadable from here."""


@dataclass(frozen=True)
class HubWeight:
    """Weights a config key names on the timm hub, and where they can be downloaded from."""

    key: str  # the dotted config key, e.g. mining.backbone.name
    name: str  # the timm name, tag included
    repo: str | None  # Hugging Face hub repository
    revision: str | None
    filenames: tuple[str, ...]  # files of the repository to look for, preferred first
    url: str | None = None  # direct download, for timm entries without a hub repository

    @property
    def source(self) -> str:
        """Where the weights come from, in words."""
        return f"Hugging Face hub {self.repo}" if self.repo else str(self.url)


def hub_weight(key: str, vit: VitSettings) -> HubWeight | None:
    """The hub weights that the ViT setting at ``key`` loads; None when it loads none (random
    init), a local ``checkpoint``, or weights that the timm entry keeps in a local file."""
    if not vit.pretrained or vit.checkpoint:
        return None
    from timm.models import get_pretrained_cfg

    check_vit_name(vit.name)
    cfg = get_pretrained_cfg(vit.name)
    if cfg is None or cfg.file or cfg.state_dict:
        return None
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        filename = cfg.hf_hub_filename or _BIN_NAME
        return HubWeight(f"{key}.name", vit.name, repo, revision or None, _safe_first(filename))
    if cfg.url:
        return HubWeight(f"{key}.name", vit.name, None, None, (), cfg.url)
    return None


def _safe_first(filename: str) -> tuple[str, ...]:
    """The files timm tries for a hub ``filename``: its safetensors twin first, as timm does."""
    if filename == _BIN_NAME:
        return _SAFE_NAME, filename
    if filename.endswith(".bin") and not filename.startswith("open_clip"):
        return filename[:-4] + ".safetensors", filename
    return (filename,)


def config_hub_weights(s: Settings) -> list[HubWeight]:
    """Every hub weight the settings load, in :data:`VIT_KEYS` order (one per key)."""
    out = []
    for key in VIT_KEYS:
        section, field = key.split(".")
        weight = hub_weight(key, getattr(getattr(s, section), field))
        if weight is not None:
            out.append(weight)
    return out


def cache_folder(setting: str | None) -> Path:
    """The weights cache, as an absolute path (the manifest's files must not depend on a job's
    working directory): the ``weights_cache`` setting, else ``$XDG_CACHE_HOME/maskdistill/weights``
    (``~/.cache/maskdistill/weights``)."""
    if setting:
        return Path(setting).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(base) / "maskdistill" / "weights").absolute()


def cached_file(weight: HubWeight, folder: Path) -> Path | None:
    """The cached file of ``weight`` in ``folder``, found without the network; None if absent.

    Hub repositories are kept in the Hugging Face cache layout (so a ``weights_cache`` may point
    at an existing Hugging Face hub cache); URL downloads under ``checkpoints/``.
    """
    if weight.repo is None:
        path = folder / "checkpoints" / _url_file_name(str(weight.url))
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    for filename in weight.filenames:
        found = try_to_load_from_cache(weight.repo, filename, cache_dir=folder, revision=weight.revision)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _url_file_name(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def unreachable(url: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """Why ``url``'s host cannot be reached from here (one attempt, no retries), or None.

    Any HTTP answer, an error status included, means the host is reachable.
    """
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as err:
        return f"{urlparse(url).netloc or url} cannot be reached ({getattr(err, 'reason', err)})"


def download(weight: HubWeight, folder: Path, timeout: float = REACH_TIMEOUT_S) -> Path:
    """Download ``weight`` into ``folder`` and return its file; :class:`WeightsUnavailable` (with
    the reason) when the hub is offline, unreachable or has no such file."""
    if weight.repo is None:
        return _download_url(str(weight.url), folder / "checkpoints", timeout)
    from huggingface_hub import constants, errors, hf_hub_download

    if constants.HF_HUB_OFFLINE:
        raise WeightsUnavailable("the Hugging Face hub is switched off here (HF_HUB_OFFLINE is set)")
    reason = unreachable(constants.ENDPOINT, timeout)
    if reason:
        raise WeightsUnavailable(reason)
    missing = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
    for filename in weight.filenames:
        try:
            return Path(hf_hub_download(weight.repo, filename, revision=weight.revision, cache_dir=folder,
                                        etag_timeout=timeout))
        except missing:
            continue
        except (OSError, ValueError) as err:  # the hub's HTTP errors are OSErrors
            raise WeightsUnavailable(f"download from {weight.source} failed ({err})") from err
    raise WeightsUnavailable(f"{weight.source} holds none of {list(weight.filenames)}")


def _download_url(url: str, folder: Path, timeout: float) -> Path:
    final = folder / _url_file_name(url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, \
                atomic_path(final, suffix=".part") as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise WeightsUnavailable(f"download from {url} failed ({getattr(err, 'reason', err)})") from err
    return final


def fetch_weights(weights: list[HubWeight], folder: Path,
                  timeout: float = REACH_TIMEOUT_S) -> dict[str, Any]:
    """Make sure every weight is in ``folder`` (downloading what is missing) and return the
    manifest: the cache folder and, per weight, its config key, name, source and file.

    Raises one :class:`WeightsUnavailable` naming every weight that is neither cached nor
    downloadable, with its config key, and how to fix it. Once a download fails, the remaining
    weights are only looked up in the cache (no second wait on the same network).
    """
    entries, errors = [], []
    offline_reason: str | None = None
    for weight in weights:
        file = cached_file(weight, folder)
        if file is None and offline_reason is None:
            try:
                file = download(weight, folder, timeout)
            except WeightsUnavailable as err:
                offline_reason = str(err)
        if file is None:
            errors.append(f"config key '{weight.key}': '{weight.name}' ({weight.source}) is not in the "
                          f"weights cache {folder} and cannot be downloaded: {offline_reason}")
            continue
        entries.append({"key": weight.key, "name": weight.name, "source": weight.source,
                        "file": str(file), "bytes": file.stat().st_size})
    if errors:
        raise WeightsUnavailable("\n  ".join(["hub weights unavailable:", *errors]) + "\n" + _FIXES)
    return {"cache": str(folder), "weights": entries}


_FIXES = """  Either run the workflow once where the internet can be reached (the fetch_weights rule runs
  where Snakemake runs, e.g. a login node, and fills the weights cache; `weights_cache:` names that
  folder, which every node must see), or copy the weights to a local file and set the key's
  `checkpoint:` (e.g. mining.backbone.checkpoint: /path/to/dino_deitsmall16_pretrain.pth)."""


def manifest_file(manifest: str | os.PathLike[str], name: str) -> Path | None:
    """The cached file of the hub weights ``name`` that a :func:`fetch_weights` manifest lists;
    None when it lists none (the ViT loads no hub weights). A listed file that is gone is an error
    saying how to fetch it again."""
    path = Path(manifest)
    for entry in read_json(path).get("weights", []):
        if entry.get("name") == name:
            file = Path(entry["file"])
            if not file.is_file():
                raise WeightsUnavailable(
                    f"{path}: the weights of '{name}' ({entry['key']}) are gone from the weights cache "
                    f"({file}); delete {path} and rerun where the internet can be reached")
            return file
    return None


def weights_for(vit: VitSettings, key: str, manifest: str | os.PathLike[str] | None,
                cache_setting: str | None) -> Path | None:
    """The local file of the hub weights that the ViT setting at ``key`` loads, or None when it
    loads none: from the manifest when given (the workflow's jobs: offline), else from the cache,
    downloading it there if needed (a command run by hand)."""
    weight = hub_weight(key, vit)
    if weight is None:
        return None
    if manifest:
        file = manifest_file(manifest, vit.name)
        if file is None:
            raise WeightsUnavailable(f"{manifest}: lists no weights for '{vit.name}' ({weight.key}); "
                                     "delete it and rerun")
        return file
    folder = cache_folder(cache_setting)
    return Path(fetch_weights([weight], folder)["weights"][0]["file"])
