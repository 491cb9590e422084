"""The warm start's cache key covers what shapes the weights (issue 25, item 7): settings,
data, the code that builds and trains the model, and the library versions."""

import importlib
import inspect

import pytest

from megatron_agpo.trainer import warmstart
from megatron_agpo.trainer.config import DataSection, ModelSection
from tests.dist_utils import called_together


def test_key_names_the_code_that_shapes_the_weights():
    # The modules that build the model, train it, make its data and its tokenizer.
    assert set(warmstart._weight_modules(DataSection())) == {
        warmstart._build_and_warm_start.__module__,
        warmstart.generate_arithmetic.__module__,
        warmstart.build_char_tokenizer.__module__,
    }
    assert warmstart.WEIGHT_LIBRARIES == ("torch", "transformers", "megatron-core")
    versions = warmstart._library_versions()
    import torch
    import transformers

    assert versions["torch"] == torch.__version__
    assert versions["transformers"] == transformers.__version__
    assert versions["megatron-core"] != "absent"


def test_a_changed_policy_is_a_new_cache_entry():
    # The real warm-start source, changed as a refactor that changes the policy would change
    # it (a different weight decay), gives another digest; a comment or docstring edit or
    # reformatting does not.
    name = "megatron_agpo.trainer.warmstart"
    src = inspect.getsource(importlib.import_module(name))
    base = warmstart.code_digest({name: src})
    assert "weight_decay=0.01" in src
    changed = src.replace("weight_decay=0.01", "weight_decay=0.02")
    assert warmstart.code_digest({name: changed}) != base
    cosmetic = src.replace(
        '    """What a correct response looks like for the tiny model."""',
        '    """What a correct response looks like (reworded)."""\n    # a comment',
    )
    assert cosmetic != src
    assert warmstart.code_digest({name: cosmetic}) == base
    # The key follows the digest of the named modules and the library versions.
    model, data = ModelSection(), DataSection()
    key = warmstart._key(model, data)
    assert warmstart._key(model, data) == key  # deterministic
    real_read = inspect.getsource

    def patched(obj):
        text = real_read(obj)
        return changed if getattr(obj, "__name__", "") == name else text

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(warmstart.inspect, "getsource", patched)
        assert warmstart._key(model, data) != key
    with pytest.MonkeyPatch.context() as mp:
        real = warmstart._library_versions()
        mp.setattr(warmstart, "_library_versions", lambda: {**real, "transformers": "0.0.1"})
        assert warmstart._key(model, data) != key
    assert warmstart._key(model, data) == key


def test_cached_folder_is_named_by_the_key(tmp_path, monkeypatch):
    # tiny_policy_dir reuses a folder only under the current key: a folder made by other code
    # (an old key) is not picked up, and the build runs into the new key's folder.
    model = ModelSection(cache_dir=str(tmp_path))
    data = DataSection()
    old = tmp_path / "tiny-arith-3ca2f0f52345"  # the key before code and versions counted
    old.mkdir()
    (old / "config.json").write_text("{}")
    built = []

    def fake_build(m, d, out, log=print):
        (out / "config.json").write_text("{}")
        built.append(out)
        return 1.0

    monkeypatch.setattr(warmstart, "build_and_warm_start", fake_build)
    out = warmstart.tiny_policy_dir(model, data, log=lambda *_: None)
    assert out == tmp_path / f"tiny-arith-{warmstart._key(model, data)}" and out != old
    assert len(built) == 1
    assert warmstart.tiny_policy_dir(model, data, log=lambda *_: None) == out
    assert len(built) == 1  # cached now


def test_runs_started_together_build_the_entry_once(tmp_path, monkeypatch):
    """Two runs on an empty cache at once (parallel test workers, two jobs on a machine): one
    builds, the other waits for it and takes its folder (no second build, no failed rename
    onto the finished folder)."""
    import time

    model = ModelSection(cache_dir=str(tmp_path))
    data = DataSection()
    built = []

    def slow_build(m, d, out, log=print):
        built.append(out)
        time.sleep(0.5)
        (out / "config.json").write_text("{}")
        return 1.0

    monkeypatch.setattr(warmstart, "build_and_warm_start", slow_build)
    got, errors = called_together(
        lambda: warmstart.tiny_policy_dir(model, data, log=lambda *_: None), 2
    )
    assert not errors, errors
    assert len(built) == 1 and got == [tmp_path / f"tiny-arith-{warmstart._key(model, data)}"] * 2
