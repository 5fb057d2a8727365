"""Print the README's benchmark tables from the JSON files in benchmarks/results/.

    python benchmarks/report.py            # print them
    python benchmarks/report.py --readme   # also rewrite README.md between its <!-- report:NAME --> markers

Every figure comes from a result file written by a script here; each row names the command.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = "mmsearch-lite2"  # the default model (mmsearch.config.DEFAULT_MODEL)


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(r: dict) -> str:
    return " / ".join(f"{r[k]:.3f}" for k in ("1", "5", "10"))


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
          + (f" and `{torch_r['command']}`" if torch_r else "") + "; details under [Benchmarks](#benchmarks).")


def _torch_recall10() -> str:
    r = load(f"recall_flickr8k_{DEFAULT}_test_torch_fp32.json")
    return f"{r['t2i']['10']:.3f} / {r['i2t']['10']:.3f}" if r else "–"


def main() -> None:
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
    print_backend_parity()

    throughput = {}
    for path in sorted(RESULTS.glob("throughput_*.json")):
        tp = json.loads(path.read_text())
        throughput[tp.get("model", "mmsearch-lite")] = tp

    candidates = [json.loads(p.read_text()) for p in sorted((RESULTS / "model_candidates").glob("*.json"))]
    if candidates:
        print()
        print("Candidates for the built-in model, all selected on Flickr8k dev (train split for training, test never"
              " read), sorted by rsum (sum of the six recalls); forward speed (torch) from the throughput runs below:")
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
                  f"{(tp['torch'] if 'torch' in tp else tp)['forward_only_images_per_s'] if tp else '–'} |")

    for tp in sorted(throughput.values(), key=lambda tp: tp.get("model") != DEFAULT):  # the default model first
        if "onnx_fp32" in tp:
            print_throughput(tp)

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


BACKENDS = (("torch", "torch (eager)"), ("onnx_fp32", "ONNX Runtime fp32"), ("onnx_int8", "ONNX Runtime int8"))


def _recalls(r: dict) -> dict:
    """{(direction, k, "corrected"|"plain"): recall} of a recall record."""
    plain = r.get("plain") or r
    return {**{(d, k, "corrected"): r[d][k] for d in ("t2i", "i2t") for k in ("1", "5", "10")},
            **{(d, k, "plain"): plain[d][k] for d in ("t2i", "i2t") for k in ("1", "5", "10")}}


def print_backend_parity() -> None:
    """Under the recall table (rendered as a paragraph each): torch vs ONNX fp32, int8 vs fp32."""
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
    print_issue3_targets()


def print_issue3_targets() -> None:
    r = load(f"recall_flickr8k_{DEFAULT}_test.json")
    if not r:
        return
    targets = {("t2i", "1"): 0.25, ("t2i", "10"): 0.65, ("i2t", "1"): 0.30, ("i2t", "10"): 0.72}
    got = lambda src: ", ".join(f"{src[d][k]:.3f} ({'met' if src[d][k] >= v else 'MISSED'})"  # noqa: E731
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
    ok = lambda c: "met" if c else "MISSED"  # noqa: E731
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
    sys.path.insert(0, str(RESULTS.parents[1]))
    from mmsearch.config import TrainConfig

    return getattr(TrainConfig, field)


SECTIONS = {"headline": print_headline, "benchmarks": main}


def render(section: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        SECTIONS[section]()
    return buf.getvalue().strip("\n")


def update_readme(readme: Path) -> list[str]:
    """Rewrite what sits between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` in ``readme`` with
    section NAME; returns the sections rewritten. Text outside the markers is left as it is."""
    text, done = readme.read_text(), []
    for name in SECTIONS:
        begin, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            text = f"{head}{begin}\n{render(name)}\n{end}{rest.split(end, 1)[1]}"
            done.append(name)
    readme.write_text(text)
    return done


if __name__ == "__main__":
    for name in SECTIONS:
        print(render(name), end="\n\n")
    if "--readme" in sys.argv[1:]:
        print(f"README.md: rewrote {', '.join(update_readme(RESULTS.parents[1] / 'README.md')) or 'nothing'}",
              file=sys.stderr)
