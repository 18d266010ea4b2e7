"""The reference weights' identity in the cache key: content, not names. A Hub id is identified through the local Hub
cache snapshot its revision resolves to (a re-push under the same branch changes it), a local folder by a full digest
of its weight files (any edited byte changes it), stored beside the cache and reused while size and mtime match.

The Hub cache here is laid out by hand exactly as huggingface_hub writes it (`models--ORG--NAME/blobs/<sha256>`,
`snapshots/<commit>/<file>` links, `refs/<revision>` holding the commit): no network."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sfm_dpo import ref_cache


def write_hub_snapshot(hub: Path, repo_id: str, commit: str, files: dict[str, Path], revision: str = "main") -> None:
    """Adds `files` (name -> a local file) as `commit` of `repo_id` to the Hub cache `hub`, points refs/<revision>."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for name, source in files.items():
        blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        shutil.copyfile(source, blob)
        link = repo / "snapshots" / commit / name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs" / revision).write_text(commit)


def big_and_small(path: Path, small_value: float = 0.0) -> Path:
    """A weights file with a 16 MiB tensor beside a 16-element one: sampled blocks mostly miss the small one."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"embed.weight": torch.arange(4 * 1024 * 1024, dtype=torch.float32).reshape(1024, 4096),
               "norm.bias": torch.full((16,), small_value)}  # fmt: skip
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 4096}))
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hf_home" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(hub.parent))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


def test_hub_id_is_identified_by_its_snapshot_not_its_branch(tmp_path, hub):
    v1 = big_and_small(tmp_path / "v1", 0.0)
    v2 = big_and_small(tmp_path / "v2", 1.0)
    files = lambda d: {"model.safetensors": d / "model.safetensors", "config.json": d / "config.json"}  # noqa: E731
    write_hub_snapshot(hub, "org/sft-7b", "a" * 40, files(v1))
    digests = tmp_path / "digests"
    first = ref_cache.model_identity("org/sft-7b", None, digest_dir=digests)
    assert ref_cache.model_identity("org/sft-7b", "main", digest_dir=digests) == first
    assert "main" not in json.dumps(first) and "org/sft-7b" not in json.dumps(first)

    # The SFT model is pushed again under the same id and branch: refs/main now names another commit.
    write_hub_snapshot(hub, "org/sft-7b", "b" * 40, files(v2))
    second = ref_cache.model_identity("org/sft-7b", None, digest_dir=digests)
    assert second != first
    # The old commit, asked for by hash, is still the old weights; a commit that only changed the README keeps them.
    assert ref_cache.model_identity("org/sft-7b", "a" * 40, digest_dir=digests) == first
    write_hub_snapshot(hub, "org/sft-7b", "c" * 40, files(v2))
    assert ref_cache.model_identity("org/sft-7b", None, digest_dir=digests) == second
    # A local copy of the same files is the same model.
    assert ref_cache.model_identity(str(v2), None, digest_dir=digests) == second


def test_hub_id_missing_from_the_cache_is_an_error(hub):
    with pytest.raises(ValueError, match="org/absent"):
        ref_cache.model_identity("org/absent", "main")


def test_one_tensor_edit_changes_the_identity_and_moving_keeps_it(tmp_path):
    digests = tmp_path / "digests"
    model = big_and_small(tmp_path / "model", 0.0)
    before = ref_cache.model_identity(str(model), None, digest_dir=digests)
    size = (model / "model.safetensors").stat().st_size

    edited = load_file(model / "model.safetensors")
    edited["norm.bias"][3] = 0.5  # same shapes and dtypes: same header and file size
    save_file(edited, model / "model.safetensors")
    assert (model / "model.safetensors").stat().st_size == size
    after = ref_cache.model_identity(str(model), None, digest_dir=digests)
    assert after != before

    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.copytree(model, moved)
    assert ref_cache.model_identity(str(moved), None, digest_dir=digests) == after
    # Remote code is the forward of a trust_remote_code model: part of the identity too.
    (moved / "modeling_toy.py").write_text("def forward(x):\n    return x\n")
    assert ref_cache.model_identity(str(moved), None, digest_dir=digests) != after


def test_file_digests_are_stored_and_reused_while_size_and_mtime_match(tmp_path, monkeypatch):
    digests = tmp_path / "digests"
    model = big_and_small(tmp_path / "model")
    reads = []
    real = ref_cache.file_digest

    def counting(path):
        reads.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(ref_cache, "file_digest", counting)
    first = ref_cache.model_identity(str(model), None, digest_dir=digests)
    assert sorted(reads) == ["config.json", "model.safetensors"]
    reads.clear()
    assert ref_cache.model_identity(str(model), None, digest_dir=digests) == first
    assert reads == []  # both digests came from the store
    # A file rewritten in place (new mtime) is read again; an independent digest of its bytes is what is stored.
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert ref_cache.model_identity(str(model), None, digest_dir=digests) == first
    assert reads == ["model.safetensors"]
    import xxhash

    stored = [json.loads(p.read_text()) for p in digests.iterdir()]
    assert {s["xxh3_128"] for s in stored} == {
        xxhash.xxh3_128(weights.read_bytes()).hexdigest(),
        xxhash.xxh3_128((model / "config.json").read_bytes()).hexdigest(),
    }


def test_a_folder_without_weights_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="No weight files"):
        ref_cache.model_identity(str(tmp_path), None)
