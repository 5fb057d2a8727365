"""Files to vectors: decoding images and sampling videos ahead of the forward pass, in batches.

:func:`embed_files` is what every indexing run embeds with: in this process
(:class:`mmsearch.indexing.IndexWriter`) or in the actors of a Ray cluster
(:mod:`mmsearch.scale.embed`), so both give the same records, vectors and skipped files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from ._util import batched, ordered_map, prefetch_iter
from .config import IndexingConfig
from .errors import MediaError, MediaReadError
from .encoder import embed_texts_with
from .media import MediaFile, Skipped, is_transient, load_image
from .video import VideoSampler


def _reason(e: Exception, path: str) -> str:
    return str(e).split(": ", 1)[-1] if str(e).startswith(path) else str(e)


def decode_image(f: MediaFile, encoder, max_pixels: int) -> tuple[np.ndarray | None, Skipped | None]:
    """Decode and preprocess one image file: (pixels, None), or (None, why it was skipped)."""
    try:
        image = load_image(f.path, max_pixels=max_pixels, min_side=getattr(encoder, "image_size", None))
        return encoder.preprocess(image), None
    except (MediaError, OSError) as e:
        return None, Skipped(f.path, _reason(e, f.path), unreadable=_try_again(e))


def _try_again(e: Exception) -> bool:
    """Whether a file that failed with ``e`` could work next run (it could not be read now, or it went
    away after the scan) rather than being broken."""
    return isinstance(e, (MediaReadError, FileNotFoundError)) or is_transient(e)


def _video_batches(f: MediaFile, encoder, config: IndexingConfig, videos: dict | None = None):
    """The batches of one video's sampled frames (see ``_visual_batches``); once they are all sampled,
    ``videos[path]`` holds the video's shots and how it was sampled (``VideoSampler``)."""

    pixels, records = [], []
    sampler = VideoSampler(f.path, config.frame_interval, config.skip_similar, min_side=encoder.image_size)
    try:
        for frame in sampler.frames():
            pixels.append(encoder.preprocess(frame.image))
            records.append(replace(f, t=frame.t, shot=frame.shot))
            if len(pixels) == config.batch_size:
                yield np.stack(pixels), records, [], False, 0
                pixels, records = [], []
    except (MediaError, OSError) as e:  # the frames already sent are dropped by the consumer
        yield None, [], [Skipped(f.path, _reason(e, f.path), unreadable=_try_again(e))], True, 1
        return
    if videos is not None:
        videos[f.path] = (list(sampler.shots), sampler.mode)
    yield (np.stack(pixels) if pixels else None), records, [], True, 1


def _visual_batches(files: Sequence[MediaFile], encoder, config: IndexingConfig, videos: dict | None = None):
    """(pixels or None, records, skipped, boundary, files done) per batch of images or video frames.

    Images are decoded in worker threads (Pillow releases the GIL while decoding and resizing), in
    file order, and batched ``batch_size`` at a time; a video streams its sampled frames (one record
    per frame, with its time), so a long video never sits in memory. ``boundary`` is False inside a
    video: committing there would store half a video as if it were complete. A video that fails
    part way is reported in ``skipped`` after some of its frames: the consumer must drop those.
    """
    bs = config.batch_size
    pixels, ok, bad = [], [], []

    def decode(f: MediaFile):
        return None if f.kind == "video" else decode_image(f, encoder, config.max_pixels)

    for f, decoded in zip(files, ordered_map(decode, files, workers=config.decode_threads, ahead=2 * bs)):
        if f.kind == "video" or len(ok) + len(bad) == bs:
            if ok or bad:
                yield (np.stack(pixels) if pixels else None), ok, bad, True, len(ok) + len(bad)
                pixels, ok, bad = [], [], []
        if f.kind == "video":
            yield from _video_batches(f, encoder, config, videos)
            continue
        px, skipped = decoded
        if skipped is not None:
            bad.append(skipped)
        else:
            pixels.append(px)
            ok.append(f)
    if ok or bad:
        yield (np.stack(pixels) if pixels else None), ok, bad, True, len(ok) + len(bad)


def embed_files(
    files: Sequence[MediaFile],
    encoder,
    config: IndexingConfig = IndexingConfig(),
    on_progress: Callable[[int], None] | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
    videos: dict | None = None,
):
    """Yield (records, embeddings, boundary) per batch; decoding runs ahead of the forward pass in a
    thread. Records are the files (one per video frame, with ``t`` set); ``boundary`` says whether
    committing after this batch is safe (not in the middle of a video). ``on_skip`` is called for
    files that fail, before the batch that follows them (for a video: after its frames so far).
    ``videos`` (a dict) receives each sampled video's (shots, sampling mode)."""
    texts = [f for f in files if f.kind == "text"]
    for chunk in batched(texts, 256):
        yield list(chunk), embed_texts_with(encoder, [f.text for f in chunk], config.lang), True
        if on_progress:
            on_progress(len(chunk))
    visual = [f for f in files if f.kind != "text"]
    for pixels, ok, bad, boundary, files_done in prefetch_iter(_visual_batches(visual, encoder, config, videos), depth=2):
        for s in bad:
            if on_skip:
                on_skip(s)
        emb = encoder.embed_pixels(pixels) if pixels is not None else np.zeros((0, encoder.dim), np.float32)
        yield ok, emb, boundary
        if on_progress and files_done:
            on_progress(files_done)
