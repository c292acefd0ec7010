"""A small random-weight Qwen3-VL in the Hugging Face layout, for benchmarks (not committed).

    tools/reference/run.sh make_bench_model.py OUT_DIR [small|2b]

`small` is a CPU-sized model (text 512 wide, 8 layers; vision 384 wide, 8 blocks); `2b` has the
Qwen3-VL-2B-Instruct shapes. Weights are random (seeded); the tokenizer, chat template and
processor configs are those of the tiny fixtures.
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "fixtures" / "models" / "tiny-tied"

SHAPES = {
    "small": dict(text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=64, mrope_section=[16, 8, 8], vocab_size=16384),
                  vision=dict(depth=8, hidden_size=384, intermediate_size=1536, num_heads=6,
                              deepstack_visual_indexes=[2, 4, 6])),
    "2b": dict(text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20], vocab_size=151936),
               vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                           deepstack_visual_indexes=[5, 11, 17])),
}


def main():
    out = Path(sys.argv[1])
    shape = SHAPES[sys.argv[2] if len(sys.argv) > 2 else "small"]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in FIXTURE.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, out / f.name)
    tiny = Qwen3VLConfig.from_pretrained(FIXTURE)
    t, v = shape["text"], shape["vision"]
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                         intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
                         num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
                         head_dim=t["head_dim"], rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                                  "mrope_section": t["mrope_section"],
                                                                  "mrope_interleaved": True},
                         tie_word_embeddings=True),
        vision_config=dict(depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                           num_heads=v["num_heads"], out_hidden_size=t["hidden_size"],
                           deepstack_visual_indexes=v["deepstack_visual_indexes"], num_position_embeddings=2304),
        image_token_id=tiny.image_token_id, video_token_id=tiny.video_token_id,
        vision_start_token_id=tiny.vision_start_token_id, vision_end_token_id=tiny.vision_end_token_id,
        tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    print(out)


if __name__ == "__main__":
    main()
