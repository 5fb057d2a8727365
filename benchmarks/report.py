"""Print the README's benchmark tables from the JSON files in benchmarks/results/.

    python benchmarks/report.py            # print them
    python benchmarks/report.py --readme   # also replace those tables in README.md (matched by header row)

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
    print("| model | split | text→image R@1 / 5 / 10 | image→text R@1 / 5 / 10 | plain cosine: text→image | "
          "plain cosine: image→text | command |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted(RESULTS.glob("recall_flickr8k_*.json")):
        r = json.loads(path.read_text())
        split = "test (1k images, 5k captions)" if path.stem.endswith("_test") else "dev"
        plain = r.get("plain") or {"t2i": r["t2i"], "i2t": r["i2t"]}  # no query bank: plain is all there is
        print(f"| {r['model']} | {split} | {fmt(r['t2i'])} | {fmt(r['i2t'])} | {fmt(plain['t2i'])} | "
              f"{fmt(plain['i2t'])} | `{r['command']}` |")
    for path in sorted(RESULTS.glob("query_bank_*.json")):
        q = json.loads(path.read_text())
        print(f"| {q['model']} (query bank: {q['settings']['text']['bank']} train photos + captions) | "
              f"dev (bank calibration) | {fmt(q['dev_hubness']['t2i'])} | {fmt(q['dev_hubness']['i2t'])} | "
              f"{fmt(q['dev_plain']['t2i'])} | {fmt(q['dev_plain']['i2t'])} | `{q['command']}` |")
    for path in sorted(RESULTS.glob("train_default_model*.json")):
        t = json.loads(path.read_text())
        model = t.get("model", "mmsearch-lite")
        print(f"| {model} ({t.get('candidate', 'heads only')}, best epoch {t['best_epoch']}) | dev (model selection) | "
              f"– | – | {fmt({k: t['dev_recall']['t2i'][k] for k in ('1', '5', '10')})} | "
              f"{fmt({k: t['dev_recall']['i2t'][k] for k in ('1', '5', '10')})} | `{t['command']}` |")

    throughput = {}
    for path in sorted(RESULTS.glob("throughput_*.json")):
        tp = json.loads(path.read_text())
        throughput[tp.get("model", "mmsearch-lite")] = tp

    candidates = [json.loads(p.read_text()) for p in sorted((RESULTS / "model_candidates").glob("*.json"))]
    if candidates:
        print()
        print("Candidates for the built-in model, all selected on Flickr8k dev (train split for training, test never"
              " read), sorted by rsum (sum of the six recalls); forward speed from the throughput runs below:")
        print()
        print("| candidate | image tower | text tower | image views | captions / step | batch | dev t2i R@1 / 5 / 10 | "
              "dev i2t R@1 / 5 / 10 | rsum | best epoch | training | other settings | forward images/s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for c in sorted(candidates, key=lambda c: -c["dev_rsum"]):
            cfg, d = c["train_config"], c["dev_recall"]
            tp = throughput.get(c.get("model", "mmsearch-lite"))
            extra = {k: v for k, v in cfg.items() if k not in ("flip_views", "zoom_views", "captions_per_step",
                                                                "batch_size", "epochs") and v != _default(k)}
            views = ["orig"] + (["flip"] if cfg.get("flip_views") else []) + (
                (["zoom"] + (["zoomflip"] if cfg.get("flip_views") else [])) if cfg.get("zoom_views") else [])
            text = c["towers"]["text"].split(" (")[1].split(",")[0]
            if c.get("start_from"):
                text += f", from {c['start_from']}"
            name = c["candidate"]
            other = ", ".join(f"{k}={v}" for k, v in extra.items()) or "–"
            image = c["towers"]["image"]
            image = image.split(" (")[0] + ("; " + image.split(", ")[-1].rstrip(")") if "trained" in image else "")
            print(f"| {name} | {image} | {text} | {', '.join(views)} | "
                  f"{cfg.get('captions_per_step', 1)} | {cfg['batch_size']} | {fmt(d['t2i'])} | {fmt(d['i2t'])} | "
                  f"{c['dev_rsum']:.3f} | {c['best_epoch']} | {c['train_seconds_heads_only']:.0f} s | {other} | "
                  f"{tp['forward_only_images_per_s'] if tp else '–'} |")

    if throughput:
        models = list(throughput)
        first = next(iter(throughput.values()))
        print()
        print(f"Throughput and latency on {first['what'].split(', model')[0].replace('throughput on ', '')} "
              f"({first['machine']}), from " + ", ".join(f"`{t['command']}`" for t in throughput.values()) + ":")
        print()
        print("| measure | " + " | ".join(models) + " |")
        print("|---|" + "---|" * len(models))
        rows = [
            ("model forward only", lambda t: f"{t['forward_only_images_per_s']} images/s"),
            ("`mmsearch index` embed stage (decode + preprocess + forward)",
             lambda t: f"{t['index_embed_stage_images_per_s']} images/s = {t['ratio_embed_stage_vs_forward']:.2f} × forward"),
            ("`mmsearch index` end to end, fresh process (imports, model load, faiss, commit)",
             lambda t: f"{t['index_end_to_end_images_per_s']} images/s = {t['ratio_end_to_end_vs_forward']:.2f} × forward "
                       f"({t['index_wall_seconds']} s)"),
            ("`mmsearch index` again, nothing changed", lambda t: f"{t['reindex_unchanged_wall_seconds']} s"),
            ("`mmsearch query \"...\"` from a cold process (median)", lambda t: f"{t['cold_query_wall_seconds_median']} s"),
            ("  of which `import torch, open_clip`",
             lambda t: f"{t.get('python_import_torch_and_open_clip_seconds', '–')} s"),
            ("query in a warm process (library)", lambda t: f"{t['warm_query_ms']} ms"),
        ]
        for name, cell in rows:
            print(f"| {name} | " + " | ".join(cell(t) for t in throughput.values()) + " |")

    scale = load("index_scale.json")
    if scale:
        print()
        print(f"Index kinds at scale ({scale['machine']}), from `{scale['command']}`; recall against exact search "
              "on held-out queries at the setting tuned at build time (target recall@10 0.95 on stored vectors); "
              "RAM = resident growth of a fresh process loading the index (memory-mapped load in brackets):")
        print()
        print("| dataset | index | parameters | build s (+ tune s) | disk B/vector | RAM B/vector | tuned setting | "
              "recall@1 | recall@10 | QPS single | QPS batched |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, ds in scale["datasets"].items():
            for method, m in ds["methods"].items():
                p = m["params"]
                row = next((r for r in m["curve"] if r["tuned"]), m["curve"][0])
                knob = next((k for k in ("nprobe", "ef_search") if k in row), None)
                params = {"flat": "exact", "hnsw": f"M={p.get('hnsw_m')}",
                          "ivfflat": f"nlist={p.get('nlist')}",
                          "ivfpq": f"nlist={p.get('nlist')}, m={p.get('m')}, re-rank k×{p.get('rerank_factor')}"}[method]
                print(f"| {name} ({ds['n']:,} × {ds['d']}) | {method} | {params} | {m['build_seconds']:.1f} "
                      f"(+{m['tune_seconds']:.1f}) | {m['disk_bytes_per_vector']:.0f} | {m['ram_bytes_per_vector']:.0f} "
                      f"({m['ram_bytes_per_vector_mmap']:.0f}) | {f'{knob}={row[knob]}' if knob else '–'} | "
                      f"{row['recall@1']:.3f} | {row['recall@10']:.3f} | {row['qps_single']:.0f} | {row['qps_batched']:.0f} |")
        for name, ds in scale["datasets"].items():
            t = ds.get("targets")
            if t and ds["n"] >= 10**6:  # the targets are set at 1M vectors
                print()
                print(f"Targets (issue 4, at 1M vectors) on {name}: IVF-PQ at the tuned nprobe={t['ivfpq_tuned']['nprobe']}: recall@10 "
                      f"{t['ivfpq_tuned']['recall@10']:.3f} (≥ 0.95: {'met' if t['recall@10 >= 0.95'] else 'MISSED'}), "
                      f"batched QPS {t['batched qps vs flat']}× Flat (≥ 20×: {'met' if t['>= 20x flat batched qps'] else 'MISSED'}), "
                      f"RAM per vector {t['ram per vector vs flat']:.3f}× Flat (≤ 1/8: {'met' if t['<= 1/8 of flat ram'] else 'MISSED'}).")

    videos = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("video_throughput_*.json"))]
    for v in videos:
        print()
        print(f"Video indexing ({v['what']}; {v['machine']}), from `{v['command']}`:")
        print()
        print("| measure | value |")
        print("|---|---|")
        print(f"| model forward only | {v['forward_only_frames_per_s']} frames/s |")
        print(f"| decode + sample + preprocess (PyAV, no model) | {v['decode_sample_preprocess_frames_per_s']} frames/s |")
        print(f"| `index_folder` end to end (model loaded) | {v['index_end_to_end_frames_per_s']} frames/s = "
              f"{v['ratio_end_to_end_vs_forward']:.2f} × forward; {v['video_seconds_indexed_per_wall_second']} s of "
              f"video per second |")
        print(f"| index size | {v['index_bytes_per_frame']:.0f} bytes/frame = {v['index_megabytes_per_hour_of_video']} MB "
              f"per hour of video |")


def _default(field: str):
    import sys

    sys.path.insert(0, str(RESULTS.parents[1]))
    from mmsearch.config import TrainConfig

    return getattr(TrainConfig, field)


def update_readme(tables_text: str, readme: Path) -> int:
    """Replace each table of ``readme`` whose header row is one of ``tables_text``'s by that table;
    returns how many were replaced."""
    def blocks(lines):
        out, cur = [], []
        for line in lines + [""]:
            if line.startswith("|"):
                cur.append(line)
            elif cur:
                out.append(cur)
                cur = []
        return out

    new = {b[0]: b for b in blocks(tables_text.splitlines())}
    lines, out, i, done = readme.read_text().splitlines(), [], 0, 0
    while i < len(lines):
        if lines[i].startswith("|") and (i == 0 or not lines[i - 1].startswith("|")) and lines[i] in new:
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out += new[lines[i]]
            done += 1
            i = j
        else:
            out.append(lines[i])
            i += 1
    readme.write_text("\n".join(out) + "\n")
    return done


if __name__ == "__main__":
    import contextlib
    import io
    import sys

    if "--readme" in sys.argv[1:]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            main()
        print(buf.getvalue(), end="")
        n = update_readme(buf.getvalue(), RESULTS.parents[1] / "README.md")
        print(f"README.md: {n} tables replaced", file=sys.stderr)
    else:
        main()
