"""Conversion throughput on SmolLM2-135M-Instruct (fp32, 538 MB): HF -> Megatron -> HF.

OMP_NUM_THREADS=2 .venv/bin/python benchmarks/convert.py
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from megatron_agpo.models import HFWeights
from megatron_agpo.models.checkpoint import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_agpo.models.smollm2 import smollm2_hf_dir


def main() -> None:
    src = smollm2_hf_dir()
    nbytes = HFWeights(src).nbytes()
    tmp = Path(tempfile.mkdtemp(prefix="agpo_convert_"))
    try:
        t0 = time.perf_counter()
        convert_hf_to_megatron(src, tmp / "ckpt")
        t1 = time.perf_counter()
        convert_megatron_to_hf(tmp / "ckpt", tmp / "hf", progress=False)
        t2 = time.perf_counter()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gb = nbytes / 1e9
    print(f"SmolLM2-135M fp32 {gb:.3f} GB (TP=1, one process; includes model build + dist init)")
    print(f"hf->megatron  {t1 - t0:6.2f} s  {gb / (t1 - t0):.3f} GB/s")
    print(f"megatron->hf  {t2 - t1:6.2f} s  {gb / (t2 - t1):.3f} GB/s")


if __name__ == "__main__":
    main()
