"""transformers side of benches/model.sh: the same work as Lookout's model bench, timed.

    bench_model.py MODEL_DIR INPUTS.safetensors [dtype] [cpu|cuda]

INPUTS comes from the Rust bench (input_ids, mm_token_type_ids, pixel_values, video_grid_thw,
decode_tokens). Prints one JSON object with the same keys as the Rust bench.
"""

import json
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import Qwen3VLForConditionalGeneration

model_dir, inputs_path = sys.argv[1], sys.argv[2]
dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[sys.argv[3] if len(sys.argv) > 3 else "f32"]
device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
x = load_file(inputs_path)
model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval().to(device)
ids = x["input_ids"][None].to(device)
pv = x["pixel_values"].to(dtype).to(device)
grid = x["video_grid_thw"].to(device)
mm = x["mm_token_type_ids"][None].to(device)


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()
pairs = int(grid[:, 0].sum())
n_decode = int(x["decode_tokens"][0])


def best(f, reps=3):
    f()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def forward():
    model(input_ids=ids, pixel_values_videos=pv, video_grid_thw=grid, mm_token_type_ids=mm, logits_to_keep=1)


with torch.inference_mode():
    vision_s = best(lambda: model.model.visual(pv, grid_thw=grid))
    full_s = best(forward)
    # Prefill timed by itself, as Lookout's bench times it: the same forward with the vision
    # tower's output computed once beforehand (the caller splits the output it gets in place,
    # so every call gets a fresh one holding the same tensors). Subtracting the vision time
    # from the full forward instead takes the difference of two noisy minima.
    encoded = model.model.visual(pv, grid_thw=grid, return_dict=True)
    kinds = type(encoded)
    model.model.visual.forward = lambda *a, **k: kinds(
        last_hidden_state=encoded.last_hidden_state, pooler_output=encoded.pooler_output,
        deepstack_features=list(encoded.deepstack_features))
    prefill_s = best(forward)
    del model.model.visual.forward

    def gen():
        model.generate(input_ids=ids, pixel_values_videos=pv, video_grid_thw=grid, mm_token_type_ids=mm,
                       attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_decode + 1,
                       min_new_tokens=n_decode + 1)
    gen_s = best(gen, reps=1)
decode_s = gen_s - full_s
print(json.dumps({
    "impl": "transformers", "threads": torch.get_num_threads(), "prompt_tokens": ids.shape[1], "frame_pairs": pairs,
    "vision_ms_per_pair": vision_s * 1000 / pairs, "prefill_tok_s": ids.shape[1] / prefill_s,
    "prefill_tok_s_by_subtraction": ids.shape[1] / (full_s - vision_s), "ttft_ms": full_s * 1000, "decode_tok_s": n_decode / decode_s,
    "kernels": (f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
                f"MKL {'yes' if torch.backends.mkl.is_available() else 'no'}, "
                f"oneDNN {'yes' if torch.backends.mkldnn.is_available() else 'no'}"
                if device == "cpu" else f"CUDA {torch.version.cuda}"),
}))
