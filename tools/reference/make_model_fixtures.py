"""Make tiny random-weight Qwen3-VL models in the Hugging Face layout, and their reference outputs.

For each model shape below this writes fixtures/models/<name>/ exactly as `save_pretrained` lays a
checkpoint out (config.json, generation_config.json, model.safetensors in bf16, tokenizer.json,
tokenizer_config.json, chat_template.jinja, processor/preprocessor configs), then runs
transformers 5.24.0 on video+text and text-only prompts and records, per case, in
fixtures/models/<name>/reference/<case>.safetensors:

  input_ids (i64), mm_token_type_ids (i64), position_ids (i64, 3 x L), rope_delta (i64),
  pixel_codes (u8, rows x 1536: pixel_values_videos = (code - 127.5) / 127.5), video_grid_thw,
  logits_last (f32, eager attention in float32), generated (i64, 16 greedy tokens, f32),
  logits_last_bf16 / generated_bf16 (the same in bfloat16)

and the prompt text in cases.json. The shapes differ where implementations go wrong: tied and
untied head, DeepStack layer lists, a vision head size that is no power of two (24), q_proj wider
than the hidden size, both config.json layouts (v5 `rope_parameters` and 4.57 `rope_scaling`).

Run: tools/reference/run.sh make_model_fixtures.py
"""

import json
import os
import random
import shutil
from pathlib import Path

os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "torchcodec")

import numpy as np
import torch
from qwen_vl_utils import process_vision_info
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (AutoProcessor, GenerationConfig, Qwen2Tokenizer, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration, Qwen3VLProcessor)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "fixtures" / "models"
CLIPS = ROOT / "fixtures" / "preprocess" / "clips"
HERE = Path(__file__).resolve().parent

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                     r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

MODELS = {
    # 2B-like: tied head, v5 config layout, vision head 16, DeepStack after blocks 1 and 2.
    "tiny-tied": dict(
        tie=True, layout="v5", seed=1,
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, rope_theta=5_000_000.0, mrope_section=[4, 2, 2]),
        vision=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                    num_position_embeddings=2304, deepstack_visual_indexes=[1, 2])),
    # 8B-like: untied head, 4.57 config layout, vision head 24 (not a power of two), q_proj 96 wide
    # on a 64-wide model, DeepStack after blocks 0, 2 and 3, a 16x16 position table.
    "tiny-untied": dict(
        tie=False, layout="4.57", seed=2,
        text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=24, rope_theta=1_000_000.0, mrope_section=[6, 3, 3]),
        vision=dict(depth=4, hidden_size=48, intermediate_size=80, num_heads=2,
                    num_position_embeddings=256, deepstack_visual_indexes=[0, 2, 3])),
}

CASES = [
    ("video_fps1", [{"role": "user", "content": [
        {"type": "video", "video": str(CLIPS / "h264_25fps_480x270.mkv"), "fps": 1.0,
         "min_pixels": 4096, "max_pixels": 16384},
        {"type": "text", "text": "What happens in this clip?"}]}]),
    ("video_system_vp9", [
        {"role": "system", "content": "You watch security cameras. Answer briefly."},
        {"role": "user", "content": [
            {"type": "video", "video": str(CLIPS / "vp9_25fps_320x240.webm"), "nframes": 6,
             "min_pixels": 4096, "max_pixels": 12000},
            {"type": "text", "text": "Is anyone there? Réponds en français 🙂"}]}]),
    ("text_only", [{"role": "user", "content": "Count from one to five, then say done."}]),
]


def corpus():
    rng = random.Random(0)
    words = ("a the person car door opens closes walks runs left right into out of camera frame red "
             "blue green white black truck dog cat bird moves stops parks enters leaves street room "
             "window light dark night day seconds second clip video what happens is anyone there "
             "count from one to five then say done answer briefly you watch security cameras yes no "
             "user assistant system describe scene people motion near far slowly quickly").split()
    extra = ["café", "réponds", "en", "français", "🙂", "日本", "über", "naïve", "<0.5 seconds>",
             "<12.3 seconds>", "3.5", "10", "2026", "\n", "  ", "\t"]
    lines = []
    for _ in range(3000):
        n = rng.randint(3, 12)
        toks = [rng.choice(words) for _ in range(n)]
        if rng.random() < 0.3:
            toks.insert(rng.randint(0, n), rng.choice(extra))
        s = " ".join(toks)
        lines.append(s.capitalize() + rng.choice([".", "?", "!", ",", ""]))
    return lines


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    state = json.loads(tok.to_str())
    vocab, merges = state["model"]["vocab"], state["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    qt = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                        pad_token="<|endoftext|>", bos_token=None,
                        extra_special_tokens=SPECIAL)
    qt.add_tokens(SPECIAL, special_tokens=True)
    qt.add_tokens(["<think>", "</think>", "<tool_call>", "</tool_call>"], special_tokens=False)
    qt.model_max_length = 262144
    return qt


def init_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "q_norm" in name \
                    or "k_norm" in name or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "pos_embed" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1] if p.dim() >= 2 else p.shape[0]
                if p.dim() == 5:
                    fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def make_model(name, spec, tokenizer):
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    t, v = spec["text"], spec["vision"]
    vocab = (len(tokenizer) + 63) // 64 * 64
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
            num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t["num_key_value_heads"], head_dim=t["head_dim"], hidden_act="silu",
            max_position_embeddings=262144, rms_norm_eps=1e-6, attention_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"],
                             "mrope_section": t["mrope_section"], "mrope_interleaved": True},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            tie_word_embeddings=spec["tie"]),
        vision_config=dict(
            depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
            num_heads=v["num_heads"], in_channels=3, patch_size=16, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=t["hidden_size"], hidden_act="gelu_pytorch_tanh",
            num_position_embeddings=v["num_position_embeddings"],
            deepstack_visual_indexes=v["deepstack_visual_indexes"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec["tie"])
    torch.manual_seed(spec["seed"])
    model = Qwen3VLForConditionalGeneration(config)
    init_weights(model, spec["seed"])
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=True, temperature=0.7,
        top_k=20, top_p=0.8)
    model.save_pretrained(d, safe_serialization=True)

    image_processor = Qwen2VLImageProcessor(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": 65536, "longest_edge": 16777216})
    video_processor = Qwen3VLVideoProcessor(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": 4096, "longest_edge": 25165824}, fps=2, min_frames=4, max_frames=768)
    template = (HERE / "qwen3vl_template.jinja").read_text()
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=template)
    processor.save_pretrained(d)

    if spec["layout"] == "4.57":
        cfg = json.loads((d / "config.json").read_text())
        tc = cfg["text_config"]
        rp = tc.pop("rope_parameters")
        tc["rope_theta"] = rp.pop("rope_theta")
        tc["rope_scaling"] = rp
        cfg.get("vision_config", {}).pop("rope_parameters", None)
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return d


def codes_of(pv):
    codes = np.rint(pv.float().numpy().astype(np.float64) * 127.5 + 127.5).astype(np.uint8)
    back = (codes.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
    assert np.array_equal(back, pv.float().numpy())
    return torch.from_numpy(codes)


def run_case(d, case, messages):
    processor = AutoProcessor.from_pretrained(d)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    _, videos, video_kwargs = process_vision_info(messages, image_patch_size=16, return_video_kwargs=True,
                                                  return_video_metadata=True)
    kwargs = {}
    if videos:
        vids, metas = zip(*videos)
        kwargs = dict(videos=list(vids), video_metadata=list(metas), do_resize=False, **video_kwargs)
    inputs = processor(text=[text], return_tensors="pt", **kwargs)
    out = {"input_ids": inputs["input_ids"][0].to(torch.int64),
           "mm_token_type_ids": inputs["mm_token_type_ids"][0].to(torch.int64)}
    record = {"case": case, "messages": json.loads(json.dumps(messages)), "prompt": text,
              "expanded": processor.tokenizer.decode(inputs["input_ids"][0])}
    for dtype, suffix in [(torch.float32, ""), (torch.bfloat16, "_bf16")]:
        model = Qwen3VLForConditionalGeneration.from_pretrained(d, dtype=dtype, attn_implementation="eager")
        model.eval()
        x = {k: v for k, v in inputs.items()}
        if "pixel_values_videos" in x:
            x["pixel_values_videos"] = x["pixel_values_videos"].to(dtype)
        with torch.no_grad():
            pos, delta = model.model.get_rope_index(
                x["input_ids"], mm_token_type_ids=x["mm_token_type_ids"],
                video_grid_thw=x.get("video_grid_thw"), attention_mask=x["attention_mask"])
            logits = model(**x).logits[0, -1].float()
            gen = model.generate(**x, do_sample=False, max_new_tokens=16)[0, x["input_ids"].shape[1]:]
        out["logits_last" + suffix] = logits.contiguous()
        out["generated" + suffix] = gen.to(torch.int64).contiguous()
        if suffix == "":
            out["position_ids"] = pos[:, 0].to(torch.int64).contiguous()
            out["rope_delta"] = delta.reshape(1).to(torch.int64)
            record["generated_text"] = processor.tokenizer.decode(gen)
    if "pixel_values_videos" in inputs:
        out["pixel_codes"] = codes_of(inputs["pixel_values_videos"])
        out["video_grid_thw"] = inputs["video_grid_thw"].to(torch.int64).contiguous()
    (d / "reference").mkdir(exist_ok=True)
    save_file(out, d / "reference" / f"{case}.safetensors")
    return record


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    summary = {"versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
               "models": {}}
    for name, spec in MODELS.items():
        d = make_model(name, spec, tokenizer)
        records = [run_case(d, case, messages) for case, messages in CASES]
        summary["models"][name] = records
        for r in records:
            print(name, r["case"], repr(r["generated_text"]))
    for r in summary["models"].values():
        for c in r:
            for m in c["messages"]:
                if isinstance(m["content"], list):
                    for part in m["content"]:
                        if "video" in part and Path(part["video"]).is_absolute():
                            part["video"] = str(Path(part["video"]).relative_to(ROOT))
    (OUT / "cases.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
