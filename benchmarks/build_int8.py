"""Make the int8 image graph a built-in model ships: its exported image tower quantised statically
(QDQ, int8 weights per channel, activation ranges calibrated on 256 Flickr8k *train* photos, seed 0).

It ships as ``mmsearch/models/<model>_image_int8.onnx`` with ``<model>_image_int8.json`` beside it
(the weights fingerprint it belongs to and how it was calibrated), so the first use of the model
has its int8 graph without any photos to calibrate on (int8 keeps the fp32 text graph: see
mmsearch/quantize.py). Run it again whenever the model's weights change.

    python benchmarks/build_int8.py --model mmsearch-lite2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch.config import DEFAULT_MODEL  # noqa: E402
from mmsearch.data import load_flickr8k  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--model", default=DEFAULT_MODEL)
    args = ap.parse_args()

    from mmsearch import models
    from mmsearch.encoder import get_encoder
    from mmsearch.exported import MANIFEST, graph_files
    from mmsearch.quantize import CALIBRATION_IMAGES, add_int8

    enc = get_encoder(args.model, precision="fp32")
    b = models.builtin(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        folder.mkdir()
        for name in [MANIFEST, "tokenizer.json", *graph_files("fp32").values()]:
            shutil.copy(enc.export_folder / name, folder / name)
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["graphs"], manifest["calibration"] = {"fp32": graph_files("fp32")}, None  # calibrate afresh
        (folder / MANIFEST).write_text(json.dumps(manifest))
        m = add_int8(folder, load_flickr8k(args.data, "train"), source="Flickr8k train split",
                     n_images=CALIBRATION_IMAGES, seed=0)
        shutil.copy(folder / graph_files("int8")["image"], b.int8_file)
    record = {"model": args.model, "weights": enc.weights, "calibration": m.calibration,
              "exporter": m.exporter, "command": f"python benchmarks/build_int8.py --model {args.model}"}
    b.int8_file.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {b.int8_file} ({b.int8_file.stat().st_size / 2**20:.1f} MB) for weights {enc.weights}")


if __name__ == "__main__":
    main()
