"""Write the synthetic catalogue's splits as JSONL: warmstart, train, eval, test (labelled),
pool.jsonl (unlabelled: what the annotators label) and pool_gold.jsonl (its gold labels, for
the ceiling student only).

    python examples/search_relevance/make_data.py --out runs/search_relevance/data --seed 0
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from megatron_agpo.data.relevance import SPLITS, SyntheticConfig, generate_synthetic, write_records


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queries", type=int, nargs=5, default=SyntheticConfig().queries,
                    help="queries per split: " + ", ".join(SPLITS))  # fmt: skip
    ap.add_argument("--hard-fraction", type=float, default=SyntheticConfig().hard_fraction)
    ap.add_argument("--label-noise", type=float, default=0.0)
    args = ap.parse_args(argv)
    cfg = SyntheticConfig(
        queries=list(args.queries), hard_fraction=args.hard_fraction, label_noise=args.label_noise
    )
    splits = generate_synthetic(cfg, args.seed)
    out = Path(args.out)
    for name in ("warmstart", "train", "eval", "test"):
        write_records(splits[name], out / f"{name}.jsonl")
    write_records(splits["pool"], out / "pool.jsonl", with_labels=False)
    write_records(splits["pool"], out / "pool_gold.jsonl")
    stats = {k: {"pairs": len(v), **Counter(r.label for r in v)} for k, v in splits.items()}
    (out / "stats.json").write_text(json.dumps({"seed": args.seed, "splits": stats}, indent=1))
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
