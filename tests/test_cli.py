"""agpo-train's command line: Hydra's --help / --cfg job / -m, one-line errors with exit code
2 before any rank starts, the pre-launch checks (megatron_agpo.validate), the quiet start.

Expected values come from the files themselves (conf/ listings, the YAML presets) or are
written out by hand; nothing here starts a rank.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from megatron_agpo import train
from megatron_agpo.backends import configure_logging, describe_fallbacks
from megatron_agpo.validate import preflight

ROOT = Path(__file__).resolve().parent.parent


def run_cli(argv, capsys):
    rc = train.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_groups_options_and_keys(capsys):
    rc, out, err = run_cli(["--help"], capsys)
    assert rc == 0 and not err
    for group in ("algorithm", "data", "model", "reward", "rollout"):
        options = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
        line = next(x for x in out.splitlines() if x.strip().startswith(group + " "))
        for o in options:
            assert o in line
    assert "[agpo]" in out and "[tiny]" in out  # conf/train.yaml's defaults
    assert "trainer.steps=60" in out and "RL steps (rollout batches)." in out
    # Values under the overrides given before --help.
    rc, out, _ = run_cli(["model=smollm2_135m", "trainer.steps=7", "--help"], capsys)
    assert rc == 0 and "trainer.steps=7" in out and "[smollm2_135m]" in out
    assert "parallel.tensor_parallel=1" in out  # from conf/model/smollm2_135m.yaml


def test_help_all_lists_every_key(capsys):
    rc, out, _ = run_cli(["--help-all"], capsys)
    assert rc == 0
    for key in ("rollout.engine.max_model_len", "algorithm.loss.eps_high", "scheduler.min_lr"):
        assert f"  {key}=" in out


def test_cfg_job_prints_the_resolved_config(capsys):
    rc, out, err = run_cli(["--cfg", "job", "model=smollm2_135m", "trainer.steps=7"], capsys)
    assert rc == 0 and not err
    cfg = yaml.safe_load(out)
    preset = yaml.safe_load((ROOT / "conf/model/smollm2_135m.yaml").read_text())
    assert cfg["trainer"]["steps"] == 7
    assert cfg["parallel"]["tensor_parallel"] == preset["parallel"]["tensor_parallel"]
    assert cfg["rollout"]["engine"]["max_model_len"] == preset["rollout"]["engine"]["max_model_len"]
    assert "${" not in out  # resolved (the preset's hf_path uses ${oc.env:HOME})


@pytest.mark.e2e
def test_console_script_exit_codes():
    """The real entry point, in a subprocess: 0 for --help, 2 and one line for a typo."""
    ok = subprocess.run(
        [sys.executable, "-m", "megatron_agpo.train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "Config groups" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "megatron_agpo.train", "trainer.stepz=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "agpo-train: error: trainer.stepz: no such key (did you mean trainer.steps?); "
        "`agpo-train --help-all` lists every key"
    ]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["trainer.stepz=3"], ["trainer.stepz: no such key (did you mean trainer.steps?)"]),
        (["+trainer.stepz=3"], ["trainer.stepz: no such key (did you mean trainer.steps?)"]),
        (["+trainer.steps=3"], ["+trainer.steps: the key exists"]),
        (["trainer.steps=abc"], ["trainer.steps=abc: expected an integer"]),
        (["trainer.steps=["], ["'trainer.steps=[': not a Hydra override"]),
        (["algorithm=grpox"], ["algorithm=grpox: no such option; algorithm is one of"]),
        (["data.prompts_per_step=0"], ["data.prompts_per_step=0: must be >= 1"]),
        (["trainer.steps=0"], ["trainer.steps=0: must be >= 1"]),
        (["model.hf_path=/nonexistent"], ["model.hf_path='/nonexistent': no such folder"]),
        (["model.hf_path=org/model"], ["model.hf_path='org/model': no such local folder"]),
        (
            ["parallel.tensor_parallel=3"],
            [
                "parallel.tensor_parallel=3 does not divide the tiny model's 4 attention heads",
                "parallel.tensor_parallel=3 does not divide model.tiny_ffn=512",
                "nproc=2 is not divisible by parallel.tensor_parallel",
            ],
        ),
        (
            ["rollout.engine.max_model_len=1"],
            ["rollout.max_new_tokens=16 leaves no", "rollout.engine.max_model_len=1 is out"],
        ),
        (["rollout.max_new_tokens=64"], ["rollout.max_new_tokens=64 leaves no room"]),
        (["data=math_jsonl"], ["data.path is empty"]),
        (["data=math_jsonl", "data.path=/nope.jsonl"], ["data.path='/nope.jsonl': no such file"]),
        (["hydra.run.dir=x"], ["hydra.run.dir: Hydra's own settings are not used"]),
        (["algorithm=grpo,agpo"], ["comma-separated values sweep several runs: add -m"]),
        (["--cfg", "hydra"], ["--cfg hydra: expected `--cfg job`"]),
        (["--frobnicate"], ["unknown option '--frobnicate'"]),
    ],
)
def test_bad_input_is_one_line_per_problem_exit_2(argv, expected, capsys, monkeypatch):
    monkeypatch.delenv("AGPO_DEBUG", raising=False)
    monkeypatch.setattr(train, "_launch", _no_launch)
    monkeypatch.setattr(train, "run", _no_launch)
    rc, out, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and not out
    assert len(lines) == len(expected), lines
    for line, want in zip(lines, expected, strict=True):
        assert line.startswith(f"agpo-train: error: {want}"), line


def _no_launch(*args):
    raise AssertionError(f"nothing may start on bad input: {args}")


def test_debug_flag_shows_the_traceback(capsys):
    with pytest.raises(train.UsageError, match="trainer.stepz"):
        train.main(["trainer.stepz=3", "--debug"])


def _hf_folder(path: Path, heads: int = 9, kv: int = 3, ctx: int = 512) -> Path:
    path.mkdir(parents=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64 * heads,
        "intermediate_size": 1536,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": 49152,
        "max_position_embeddings": ctx,
    }
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "tokenizer.json").write_text("{}")
    return path


def test_preflight_reads_the_model_folder(tmp_path):
    model = _hf_folder(tmp_path / "m")  # SmolLM2-like: 9 heads, 3 KV heads
    base = [f"model.hf_path={model}", "rollout.engine.max_model_len=512", "nproc=2"]
    cfg = train.load_config([*base, "parallel.tensor_parallel=2"], validate=False)
    (problem,) = preflight(cfg, world_size=2)
    assert problem.startswith("parallel.tensor_parallel=2, parallel.pipeline_parallel=1 do not")
    assert "num_attention_heads=9 is not divisible by tensor_parallel=2" in problem
    cfg = train.load_config([*base, "parallel.tensor_parallel=1"], validate=False)
    assert preflight(cfg, world_size=2) == []
    cfg = train.load_config(
        [*base, "parallel.tensor_parallel=1", "rollout.engine.max_model_len=1024"],
        validate=False,
    )
    assert preflight(cfg, world_size=1) == [
        "rollout.engine.max_model_len=1024 exceeds the model's context "
        "(max_position_embeddings=512)"
    ]
    (tmp_path / "empty").mkdir()
    cfg = train.load_config([f"model.hf_path={tmp_path / 'empty'}"], validate=False)
    assert "no config.json in that folder" in preflight(cfg)[0]


def test_preflight_names_data_file_row_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"problem": f"{i}+1", "answer": str(i + 1)} for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["data=math_jsonl", f"data.path={data}"]
    cfg = train.load_config([*base, "data.num_eval=2"], validate=False)
    assert preflight(cfg, world_size=2) == []
    cfg = train.load_config([*base, "data.num_eval=5"], validate=False)
    assert preflight(cfg) == [
        f"data.path: {data}: 5 rows, not more than the 5 held out for evaluation "
        "(data.num_eval): nothing left to train on; lower data.num_eval or add rows"
    ]
    data.write_bytes(data.read_bytes() + b'{"problem": "caf\xe9", "answer": "1"}\n')
    cfg = train.load_config([*base, "data.num_eval=2"], validate=False)
    assert preflight(cfg) == [
        f"data.path: {data} row 5 (line 6): not UTF-8 text (byte 0xe9 at column 17); "
        "re-encode the file as UTF-8"
    ]


def test_multirun_checks_every_job_first_then_runs_them_in_order(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "_launch", lambda cmd, env: calls.append(cmd[3:]) or 0)
    assert train.sweep_jobs(["algorithm=grpo,agpo", "trainer.seed=0,1", "x=1"]) == [
        ["algorithm=grpo", "trainer.seed=0", "x=1"],
        ["algorithm=grpo", "trainer.seed=1", "x=1"],
        ["algorithm=agpo", "trainer.seed=0", "x=1"],
        ["algorithm=agpo", "trainer.seed=1", "x=1"],
    ]
    # One bad combination (rollout.n=1 with GRPO's group rule): nothing runs.
    rc, _, err = run_cli(["-m", "algorithm=grpo,agpo", "rollout.n=1,8"], capsys)
    assert rc == 2 and calls == []
    assert err.startswith("agpo-train: error: job 0 (algorithm=grpo rollout.n=1")
    rc, out, _ = run_cli(["-m", "algorithm=grpo,agpo", "trainer.steps=3"], capsys)
    assert rc == 0
    assert calls == [
        ["algorithm=grpo", "trainer.steps=3", "logging.run_dir=runs/default/multirun-0"],
        ["algorithm=agpo", "trainer.steps=3", "logging.run_dir=runs/default/multirun-1"],
    ]
    assert "multirun job 2/2" in out


def test_quiet_start_filters_known_fallbacks_only():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lines = []
        configure_logging("info", rank=0, log=lines.append)
        warnings.warn("Apex is not installed. Falling back to Torch Norm", stacklevel=1)
        warnings.warn("full scope is deprecated. Use empty cuda_graph_scope", stacklevel=1)
        warnings.warn("something else", stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else"]
    assert (
        lines
        == [describe_fallbacks()]
        == ["backends: no apex / Transformer Engine: torch fallbacks"]
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        configure_logging("info", rank=1, log=lines.append)
        warnings.warn("something else", stacklevel=1)
    assert seen == [] and len(lines) == 1  # rank 1: no warnings, no summary line


_IMPORT_MEGATRON = (
    "import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs, "
    "megatron.core.distributed"
)


@pytest.mark.e2e
@pytest.mark.parametrize("quiet", [True, False])
def test_megatron_fallback_warnings_are_summarised(quiet):
    """In a fresh interpreter, as a rank starts: without configure_logging megatron-core prints
    its fallback warnings (so this test can fail); with it, one summary line and none of them."""
    setup = "from megatron_agpo.backends import configure_logging; configure_logging('info', 0)"
    code = f"{setup}; {_IMPORT_MEGATRON}" if quiet else _IMPORT_MEGATRON
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr[-2000:]
    fallback_lines = [x for x in r.stderr.splitlines() if "not installed. Falling back" in x]
    if quiet:
        assert fallback_lines == []
        assert r.stdout.strip() == "backends: no apex / Transformer Engine: torch fallbacks"
    else:
        assert len(fallback_lines) >= 3
