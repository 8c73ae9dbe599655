"""Model sources: a local folder, or a Hugging Face Hub id resolved through ``huggingface_hub``.

Wherever lm4lv takes a model folder (``--llm``, ``--mae``, ``--mae-decoder``, a vision spec's
``path``, :class:`~lm4lv_core.config.ModelConfig`), it also takes ``org/name`` or
``org/name@revision`` (a branch, tag or commit). A folder that exists is used as it is; otherwise the
id is looked up in the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) and, unless
``HF_HUB_OFFLINE=1``, checked against and fetched from the Hub. Only what ``from_pretrained`` can
use is fetched: no TensorFlow / Flax / ONNX / GGUF files, and no ``*.bin`` weights when the model
also has ``*.safetensors``.

The resolved snapshot folder and its commit are recorded (``ModelConfig.hub``), so a resumed or
re-run job loads the same weights, and fetches that commit again if the snapshot was removed.
Commands resolve ids before any worker starts; inside already started workers (Python API under
a launcher) rank 0 fetches first and the other ranks wait.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# files from_pretrained never reads (other frameworks, exports, training states)
IGNORE = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.gguf", "*.tflite", "*.mlmodel",
          "*.pt", "*.pth", "*.ckpt", "flax_model*", "tf_model*", "rust_model*", "onnx/*", "original/*",
          "coreml/*", "openvino/*"]
PICKLED_WEIGHTS = ["*.bin"]  # skipped when the model has safetensors
_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# ModelConfig part -> the command-line option that names it (for messages)
OPTIONS = {"llm": "--llm", "encoder": "--encoder/--mae", "decoder": "--decoder/--mae-decoder", "adapter": "adapter",
           "deadapter": "deadapter", "mae": "--mae"}


def split_id(ref: str) -> tuple[str, str | None]:
    """``org/name@rev`` → (``org/name``, ``rev``); no ``@`` → revision ``None`` (the default branch)."""
    repo, _, rev = ref.partition("@")
    return repo, (rev or None)


def looks_like_id(ref: str) -> bool:
    repo, _ = split_id(ref)
    return bool(_ID.match(repo)) and ".." not in repo and not repo.endswith(".")


def prefetch_command(ref: str) -> str:
    repo, rev = split_id(ref)
    return f"hf download {repo}" + (f" --revision {rev}" if rev else "")


def resolve(ref: str, option: str = "model") -> tuple[str, dict[str, Any] | None]:
    """A local folder for ``ref`` and, for a hub id, its record
    ``{id, revision, commit, path}`` (``None`` for a local folder).

    Raises a one-line :class:`ConfigError` naming ``option``, the id and what to do."""
    ref = str(ref)
    p = Path(ref).expanduser()
    if p.is_dir():
        return str(p.resolve()), None
    if p.exists():
        raise ConfigError(f"{option} {ref}: not a folder (expected a model folder or a Hugging Face id org/name)")
    if not looks_like_id(ref):
        raise ConfigError(f"{option} {ref}: folder not found (and not a Hugging Face id org/name[@revision])")
    return _fetch_once(ref, option)


def part_folder(ref: str, option: str = "--encoder/--decoder") -> str:
    """The local folder of a vision part's ``ref`` (a folder, or a hub id fetched by :func:`resolve`)."""
    return resolve(ref, option)[0]


def _fetch_once(ref: str, option: str) -> tuple[str, dict[str, Any]]:
    """Rank 0 fetches first when workers already run; the others then find it in the cache."""
    from ..util import dist

    if dist.world_size() > 1 and _dist_ready():
        first = None
        if dist.is_main():
            try:
                first = ("ok", fetch(ref, option))
            except ConfigError as e:
                first = ("error", str(e))
        first = dist.broadcast_object(first)
        if first[0] == "error":
            raise ConfigError(first[1])
        if dist.is_main():
            return first[1]
        repo, _ = split_id(ref)
        return fetch(f"{repo}@{first[1][1]['commit']}", option, requested=ref)
    return fetch(ref, option)


def _dist_ready() -> bool:
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized()


def fetch(ref: str, option: str = "model", requested: str | None = None) -> tuple[str, dict[str, Any]]:
    """Resolve hub id ``ref`` (``org/name[@rev]``) to a snapshot folder in the Hugging Face cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, rev = split_id(ref)
    shown = requested or ref
    ignore = IGNORE + PICKLED_WEIGHTS
    try:
        if not constants.HF_HUB_OFFLINE:
            ignore = _ignore_for(repo, rev)
        path = snapshot_download(repo, revision=rev, ignore_patterns=ignore)
    except GatedRepoError:
        raise ConfigError(f"{option} {shown}: a gated model; accept its licence on huggingface.co, "
                          "then log in with: hf auth login") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{option} {shown}: {repo} has no revision {rev!r} on the Hugging Face Hub") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{option} {shown}: no folder of that name, and no model {repo} on the Hugging Face "
                          "Hub (a private model needs: hf auth login)") from None
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub cannot be reached")
        raise ConfigError(f"{option} {shown}: no folder of that name, and {repo}"
                          + (f" (revision {rev})" if rev else "")
                          + f" is not complete in the Hugging Face cache {constants.HF_HUB_CACHE} while {why}; "
                          f"fetch it first with: {prefetch_command(shown)}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{option} {shown}: cannot fetch it from the Hugging Face Hub ({first})") from None
    path = str(Path(path).resolve())
    return path, {"id": repo, "revision": split_id(shown)[1] or "main", "commit": Path(path).name, "path": path}


def _ignore_for(repo: str, rev: str | None) -> list[str]:
    """What not to fetch: skip pickled ``*.bin`` weights when the model has safetensors."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        files = HfApi().list_repo_files(repo, revision=rev)
    except (HfHubHTTPError, OSError):  # snapshot_download reports the problem (or uses the cache)
        return IGNORE + PICKLED_WEIGHTS
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    return IGNORE + (PICKLED_WEIGHTS if has_safetensors else [])


def local_path(ref: str, option: str = "model", record: dict[str, Any] | None = None) -> tuple[str, dict | None]:
    """Like :func:`resolve`; a ``record`` whose snapshot folder is gone is fetched again at its commit."""
    if record and not Path(ref).is_dir() and str(ref) == record.get("path"):
        path, new = resolve(f"{record['id']}@{record['commit']}", option)
        new["revision"] = record.get("revision", new["revision"])
        return path, new
    path, new = resolve(ref, option)
    if new is None and record and record.get("path") == path:
        new = record  # a recorded snapshot that is still there
    return path, new


def resolve_hub_folders(cfg):
    """Point ``cfg`` (a ``ModelConfig``, changed in place and returned) at local folders for the LLM
    and every vision part's ``path``, and record the hub ones in ``cfg.hub``."""
    records = dict(getattr(cfg, "hub", None) or {})
    seen: dict[str, tuple[str, dict | None]] = {}  # the same id for encoder and decoder: resolved once

    def one(ref: str, part: str) -> str:
        key = f"{ref}|{(records.get(part) or {}).get('commit')}"
        if key not in seen:
            seen[key] = local_path(ref, OPTIONS[part], records.get(part))
        path, rec = seen[key]
        _keep(records, part, rec)
        return path

    def put(obj, name: str, value) -> None:  # (only what changes: a resolved config stays as it is)
        if getattr(obj, name) != value:
            setattr(obj, name, value)

    put(cfg, "llm", one(str(cfg.llm), "llm"))
    for part in ("encoder", "decoder", "adapter", "deadapter"):
        spec = getattr(cfg, part)
        ref = spec.kwargs.get("path") if spec is not None and isinstance(spec.kwargs, dict) else None
        if isinstance(ref, str) and ref:
            put(spec, "kwargs", {**spec.kwargs, "path": one(ref, part)})
    put(cfg, "hub", records)
    return cfg


def _keep(records: dict[str, Any], part: str, rec: dict[str, Any] | None) -> None:
    if rec is None:
        records.pop(part, None)
    else:
        records[part] = rec
