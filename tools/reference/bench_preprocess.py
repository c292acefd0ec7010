"""Python side of benches/preprocess.sh: the reference clip preprocessing, timed.

qwen-vl-utils 0.0.14 `fetch_video` (image_patch_size=16, torchcodec reader) followed by the
transformers 5.24.0 Qwen3-VL video processor (do_resize=False, do_sample_frames=False), then the
tensors are saved with safetensors, the same work `lookout sample` does.

Prints one JSON object: seconds for imports, decode+resize, processor, save, and the total.
"""

import json
import os
import sys
import time

t0 = time.perf_counter()
os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "torchcodec")
import torch
from qwen_vl_utils import fetch_video
from safetensors.torch import save_file
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

t1 = time.perf_counter()
video_path, out_path = sys.argv[1], sys.argv[2]
fps = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
video, meta = fetch_video({"video": video_path, "fps": fps}, image_patch_size=16, return_video_metadata=True)
t2 = time.perf_counter()
vp = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2,
                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
out = vp(videos=[video], video_metadata=[meta], do_resize=False, do_sample_frames=False,
         return_metadata=True, return_tensors="pt")
t3 = time.perf_counter()
save_file({"pixel_values_videos": out["pixel_values_videos"].contiguous(),
           "video_grid_thw": out["video_grid_thw"].to(torch.int64).contiguous()}, out_path)
t4 = time.perf_counter()
print(json.dumps({
    "imports_s": t1 - t0, "fetch_video_s": t2 - t1, "processor_s": t3 - t2, "save_s": t4 - t3,
    "work_s": t4 - t1, "torch_threads": torch.get_num_threads(),
    "frame_indices": [int(i) for i in meta["frames_indices"]],
    "grid_thw": out["video_grid_thw"].tolist()[0],
}))
