"""A one-process conversion runs inside the caller and must leave its environment as it was:
a leaked RANK / MASTER_PORT makes every later `agpo-train` started from that process think it
is a rank of a finished world (seen in CI: EADDRINUSE on the leaked port, and the CLI taking
the rank path)."""

import os

import pytest

pytestmark = pytest.mark.dist  # the conversion starts a helper process (multiprocessing)

LAUNCH_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def test_in_process_conversion_restores_the_launcher_variables(tmp_path, monkeypatch):
    from megatron_agpo.models.checkpoint import convert_hf_to_megatron
    from tests.tiny_models import tiny_hf_model

    for k in LAUNCH_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")  # one that was set before stays as it was
    hf = tiny_hf_model(tmp_path / "hf")
    convert_hf_to_megatron(hf, tmp_path / "mg", tp=1, pp=1)
    assert (tmp_path / "mg").exists()
    assert os.environ["MASTER_ADDR"] == "10.0.0.7"
    for k in LAUNCH_KEYS[1:]:
        assert k not in os.environ, k
