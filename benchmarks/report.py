"""Print the README's benchmark tables from the JSON files in benchmarks/results/.

    python benchmarks/report.py

Every figure comes from a result file written by a script here; each row names the command.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(r: dict) -> str:
    return " / ".join(f"{r[k]:.3f}" for k in ("1", "5", "10"))


def main() -> None:
    print("| model | split | text→image R@1 / 5 / 10 | image→text R@1 / 5 / 10 | command |")
    print("|---|---|---|---|---|")
    for path in sorted(RESULTS.glob("recall_flickr8k_*.json")):
        r = json.loads(path.read_text())
        split = "test (1k images, 5k captions)" if path.stem.endswith("_test") else "dev"
        print(f"| {r['model']} | {split} | {fmt(r['t2i'])} | {fmt(r['i2t'])} | `{r['command']}` |")
    t = load("train_default_model.json")
    if t:
        heads = f"{t['heads']['vision']}/{t['heads']['text']} heads"
        print(f"| mmsearch-lite ({heads}, best epoch {t['best_epoch']}) | dev (model selection) | "
              f"{fmt({k: t['dev_recall']['t2i'][k] for k in ('1', '5', '10')})} | "
              f"{fmt({k: t['dev_recall']['i2t'][k] for k in ('1', '5', '10')})} | `{t['command']}` |")
    tp = load("throughput.json")
    if tp:
        print()
        print(f"Throughput and latency ({tp['what']}; {tp['machine']}), from `{tp['command']}`:")
        print()
        print("| measure | value |")
        print("|---|---|")
        rows = [
            ("model forward only", f"{tp['forward_only_images_per_s']} images/s"),
            ("`mmsearch index` embed stage (decode + preprocess + forward)",
             f"{tp['index_embed_stage_images_per_s']} images/s = {tp['ratio_embed_stage_vs_forward']:.2f} × forward"),
            ("`mmsearch index` end to end, fresh process (imports, model load, faiss, commit)",
             f"{tp['index_end_to_end_images_per_s']} images/s = {tp['ratio_end_to_end_vs_forward']:.2f} × forward "
             f"({tp['index_wall_seconds']} s)"),
            ("`mmsearch index` again, nothing changed", f"{tp['reindex_unchanged_wall_seconds']} s"),
            ("`mmsearch query \"...\"` from a cold process (median)", f"{tp['cold_query_wall_seconds_median']} s"),
            ("  of which `import torch`", f"{tp['python_import_torch_seconds']} s"),
            ("  of which `import torch, open_clip`", f"{tp.get('python_import_torch_and_open_clip_seconds', '–')} s"),
            ("query in a warm process (library)", f"{tp['warm_query_ms']} ms"),
        ]
        for name, value in rows:
            print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
