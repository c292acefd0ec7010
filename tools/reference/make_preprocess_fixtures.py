"""Make the clip-preprocessing parity fixtures.

Generates short clips with ffmpeg's test sources, then runs the reference pipeline on each for
several parameter sets: qwen-vl-utils `fetch_video` (image_patch_size=16, return_video_metadata=True,
torchcodec reader) followed by the transformers Qwen3-VL video processor with do_resize=False and
do_sample_frames=False, and the Qwen3-VL processor's timestamp rule.

Outputs (under fixtures/preprocess/):
  clips/<name>.<ext>          the clips (committed)
  cases.json                  per case: clip, params, and the reference metadata
  <case>.safetensors.gz       the reference `pixel_values_videos` stored losslessly as uint8 codes
                              (p = (code - 127.5) / 127.5; the script asserts the round trip is exact)

Run: tools/reference/run.sh make_preprocess_fixtures.py
"""

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "torchcodec")

import numpy as np
import torch
from safetensors.numpy import save as st_save
from qwen_vl_utils import fetch_video
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "fixtures" / "preprocess"
CLIPS = OUT / "clips"

# name -> (ffmpeg source, seconds, rate, size, encoder args, extension)
CLIP_SPECS = {
    # H.264 High with B-frames (and B-pyramid), 30 fps, a size that is no multiple of 32.
    "h264_high_b_30fps_342x198": ("testsrc2", 3, "30", "342x198",
        ["-c:v", "libx264", "-profile:v", "high", "-bf", "3", "-x264-params", "b-pyramid=normal", "-g", "30"], "mp4"),
    # 25 fps in a Matroska container.
    "h264_25fps_480x270": ("testsrc2", 4, "25", "480x270",
        ["-c:v", "libx264", "-profile:v", "high", "-bf", "2", "-g", "50"], "mkv"),
    # NTSC rate 29.97 in a QuickTime container.
    "h264_2997_416x234": ("testsrc2", 3, "30000/1001", "416x234",
        ["-c:v", "libx264", "-profile:v", "high", "-bf", "3"], "mov"),
    # VP9 in WebM.
    "vp9_25fps_320x240": ("testsrc2", 2, "25", "320x240",
        ["-c:v", "libvpx-vp9", "-b:v", "300k", "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "0"], "webm"),
    # Portrait.
    "h264_portrait_30fps_198x352": ("testsrc2", 2, "30", "198x352",
        ["-c:v", "libx264", "-profile:v", "high", "-bf", "3"], "mp4"),
    # Under one second.
    "h264_short_30fps_256x144": ("testsrc2", 0.8, "30", "256x144",
        ["-c:v", "libx264", "-profile:v", "high", "-bf", "3"], "mp4"),
    # H.265 and AV1.
    "hevc_24fps_320x180": ("testsrc2", 2, "24", "320x180",
        ["-c:v", "libx265", "-x265-params", "log-level=error:pools=1:frame-threads=1", "-preset", "fast"], "mkv"),
    "av1_24fps_256x144": ("testsrc2", 1.5, "24", "256x144",
        ["-c:v", "libaom-av1", "-cpu-used", "8", "-b:v", "200k", "-threads", "1"], "mkv"),
}

# Parameter sets (keys as in a qwen-vl-utils video element). Budgets are kept small so the
# committed pixel fixtures stay small; "default" runs the reference defaults on the smallest clips.
PARAMS = {
    "default": {},
    "fps1_small": {"fps": 1.0, "min_pixels": 4096, "max_pixels": 24576},
    "nframes6": {"nframes": 6, "min_pixels": 4096, "max_pixels": 20000},
    "range": {"video_start": 0.5, "video_end": 1.9, "fps": 4.0, "min_pixels": 4096, "max_pixels": 16384},
    "total": {"total_pixels": 120000, "min_pixels": 8192},
    "minmax": {"fps": 0.5, "min_frames": 6, "max_frames": 8, "min_pixels": 4096, "max_pixels": 18000},
    "upscale": {"fps": 2.0, "min_pixels": 65536, "max_pixels": 70000},
}

CASES = [
    ("h264_high_b_30fps_342x198", "fps1_small"),
    ("h264_high_b_30fps_342x198", "range"),
    ("h264_high_b_30fps_342x198", "upscale"),
    ("h264_25fps_480x270", "nframes6"),
    ("h264_25fps_480x270", "minmax"),
    ("h264_25fps_480x270", "total"),
    ("h264_2997_416x234", "fps1_small"),
    ("h264_2997_416x234", "range"),
    ("vp9_25fps_320x240", "nframes6"),
    ("vp9_25fps_320x240", "fps1_small"),
    ("h264_portrait_30fps_198x352", "total"),
    ("h264_portrait_30fps_198x352", "minmax"),
    ("h264_short_30fps_256x144", "default"),
    ("h264_short_30fps_256x144", "fps1_small"),
    ("hevc_24fps_320x180", "nframes6"),
    ("av1_24fps_256x144", "fps1_small"),
]


def make_clip(name):
    src, secs, rate, size, enc, ext = CLIP_SPECS[name]
    path = CLIPS / f"{name}.{ext}"
    if path.exists():
        return path
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
           "-i", f"{src}=size={size}:rate={rate}:duration={secs}",
           "-pix_fmt", "yuv420p", *enc, "-threads", "1", "-fflags", "+bitexact", "-flags:v", "+bitexact",
           "-map_metadata", "-1", str(path)]
    subprocess.run(cmd, check=True)
    return path


def reference(path, params):
    ele = {"video": str(path), **params}
    video, meta = fetch_video(ele, image_patch_size=16, return_video_metadata=True)
    vp = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2,
                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    out = vp(videos=[video], video_metadata=[meta], do_resize=False, do_sample_frames=False,
             return_metadata=True, return_tensors="pt")
    pv = out["pixel_values_videos"].numpy()
    grid = out["video_grid_thw"].numpy().tolist()[0]
    ts = Qwen3VLProcessor._calculate_timestamps(None, list(meta["frames_indices"]), meta["fps"], 2)
    codes = np.rint(pv.astype(np.float64) * 127.5 + 127.5)
    assert codes.min() >= 0 and codes.max() <= 255
    codes = codes.astype(np.uint8)
    back = (codes.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
    assert np.array_equal(back, pv), "pixel values are not exact uint8 codes"
    record = {
        "frame_indices": [int(i) for i in meta["frames_indices"]],
        "video_fps": float(meta["fps"]),
        "total_num_frames": int(meta["total_num_frames"]),
        "resized_height": int(video.shape[2]),
        "resized_width": int(video.shape[3]),
        "grid_thw": [int(x) for x in grid],
        "timestamps": [float(t) for t in ts],
        "timestamp_strings": [f"{t:.1f}" for t in ts],
        "rows": int(pv.shape[0]),
    }
    return record, codes


def clip_reference(path):
    """What torchcodec reports for a clip, and a digest of every decoded RGB frame."""
    import hashlib
    from torchcodec.decoders import VideoDecoder
    dec = VideoDecoder(str(path))
    md = dec.metadata
    digests = []
    for i in range(md.num_frames):
        frame = dec.get_frame_at(i).data.permute(1, 2, 0).contiguous().numpy()
        digests.append(hashlib.sha256(frame.tobytes()).hexdigest()[:16])
    return {
        "codec": md.codec, "width": md.width, "height": md.height,
        "num_frames": md.num_frames, "average_fps": md.average_fps,
        "duration_seconds": md.duration_seconds, "rgb_sha256_16": digests,
    }


def main():
    CLIPS.mkdir(parents=True, exist_ok=True)
    cases = []
    clips = {}
    for clip in CLIP_SPECS:
        path = make_clip(clip)
        clips[str(path.relative_to(ROOT))] = clip_reference(path)
    for clip, pname in CASES:
        path = make_clip(clip)
        params = PARAMS[pname]
        record, codes = reference(path, params)
        case = f"{clip}__{pname}"
        buf = st_save({"pixel_codes": codes})
        with gzip.GzipFile(OUT / f"{case}.safetensors.gz", "wb", mtime=0, compresslevel=9) as f:
            f.write(buf)
        cases.append({"case": case, "clip": str(path.relative_to(ROOT)), "params": params, "reference": record})
        print(case, record["grid_thw"], record["frame_indices"], file=sys.stderr)
    versions = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                "torchcodec": __import__("torchcodec").__version__, "qwen_vl_utils": "0.0.14",
                "ffmpeg": subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0]}
    (OUT / "cases.json").write_text(json.dumps({"versions": versions, "clips": clips, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
