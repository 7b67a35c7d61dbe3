"""Build a tiny random-weight Qwen2.5-VL checkpoint offline, in seconds.

Used by the tests and by ``captionflow demo`` on machines with no model hub: the checkpoint
has the real architecture, tokenizer special tokens, chat template and processor of
Qwen2.5-VL, so every code path (vLLM's multimodal processor, M-RoPE, the chat template) runs
for real; only the weights are random, so the captions are gibberish.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# The folder name matters: tools pick Qwen2.5-VL code paths by model name.
TINY_MODEL_DIRNAME = "qwen2.5-vl-tiny"
TINY_QWEN3_VL_DIRNAME = "qwen3-vl-tiny"
# Above the seed's max_model_len (51200), so the seed's settings are accepted unchanged.
TINY_MAX_POSITION_EMBEDDINGS = 65536
# Frames are resized by the processor only outside these bounds (56x56 .. 224x224).
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 224 * 224
TINY_VOCAB_SIZE = 600
TINY_SEED = 0

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
    "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# The Qwen2-VL chat template, as shipped with Qwen2.5-VL-*-Instruct.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS_WORDS = (
    "a the video shows person man woman dog cat car street room table light dark red green "
    "blue white black walks runs sits stands opens closes moves turns looks camera scene "
    "slowly quickly outside inside near far left right top bottom background foreground "
    "please describe in detail you are helpful assistant system user frame second minute "
    "and or with of to on at from into over under while then after before it is was are"
).split()


def _corpus() -> list[str]:
    # Deterministic pseudo-sentences: enough variety for a few hundred BPE merges.
    lines, n = [], len(_CORPUS_WORDS)
    for i in range(400):
        words = [_CORPUS_WORDS[(i * 7 + j * 13 + (i // 3) * j) % n] for j in range(6 + i % 9)]
        lines.append(" ".join(words).capitalize() + ".")
    lines += ["Please describe the video in detail.", "You are a helpful assistant."] * 20
    return lines


def _build_tokenizer(out: Path, max_positions: int = TINY_MAX_POSITION_EMBEDDINGS):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=max_positions)
    hf_tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    return hf_tok


def build_tiny_model(parent_dir: str | Path, *,
                     max_position_embeddings: int = TINY_MAX_POSITION_EMBEDDINGS) -> Path:
    """Write the checkpoint to ``parent_dir/qwen2.5-vl-tiny`` (reused if complete) and return
    that folder. Needs ``transformers``, ``tokenizers`` and ``torch``; no network.
    ``max_position_embeddings`` is the model's own context limit."""
    out = Path(parent_dir) / TINY_MODEL_DIRNAME
    if (out / ".complete").exists():
        return out
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a concurrent or interrupted build never leaves
    # a half-written model where a reader would find it.
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    tokenizer = _build_tokenizer(tmp, max_position_embeddings)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings, max_window_layers=2,
        rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, rope_theta=1_000_000.0,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
        torch_dtype="float32")
    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14,
        temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=128, window_size=56,
        fullatt_block_indexes=[1], tokens_per_second=2)
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
        **{k: text[k] for k in ("vocab_size", "hidden_size", "bos_token_id", "eos_token_id",
                                "pad_token_id", "max_position_embeddings")})
    config.vision_token_id = ids["<|vision_pad|>"]
    _save_random_model(Qwen2_5_VLForConditionalGeneration, config, ids, tmp)

    pixel_bounds = dict(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS,
                        patch_size=14, temporal_patch_size=2, merge_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixel_bounds),
        # The reference (qwen-vl-utils) pixel cap; also keeps transformers from warning.
        video_processor=Qwen2VLVideoProcessor(**pixel_bounds, cap_pixels_per_frame=True),
        tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    processor.save_pretrained(tmp)
    return _publish(tmp, out, {"random_weights": True, "seed": TINY_SEED})


def build_tiny_qwen3_vl(parent_dir: str | Path, *,
                        max_position_embeddings: int = TINY_MAX_POSITION_EMBEDDINGS) -> Path:
    """A tiny random-weight Qwen3-VL in ``parent_dir/qwen3-vl-tiny`` (reused if complete):
    Qwen3's text model with interleaved M-RoPE, the Qwen3-VL vision tower (patch 16, learned
    position embeddings, one DeepStack layer) and ``Qwen3VLProcessor``, which writes each
    frame pair's timestamp into the prompt. Same tokenizer as the Qwen2.5-VL one."""
    out = Path(parent_dir) / TINY_QWEN3_VL_DIRNAME
    if (out / ".complete").exists():
        return out
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    tokenizer = _build_tokenizer(tmp, max_position_embeddings)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=max_position_embeddings,
        # Qwen3-VL's [24, 20, 20] for head_dim 128, scaled to head_dim 32.
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                         "mrope_section": [6, 5, 5], "mrope_interleaved": True},
        pad_token_id=ids["<|endoftext|>"], dtype="float32")
    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
        temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=128,
        num_position_embeddings=256, deepstack_visual_indexes=[1])
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    config.bos_token_id = config.text_config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = config.text_config.eos_token_id = ids["<|im_end|>"]
    _save_random_model(Qwen3VLForConditionalGeneration, config, ids, tmp)

    # Patch 16, merge 2: sizes are multiples of 32. Per-frame bounds as for Qwen2.5-VL.
    image_bounds = dict(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS,
                        patch_size=16, temporal_patch_size=2, merge_size=2)
    video_size = {"shortest_edge": 64 * 64, "longest_edge": TINY_MAX_PIXELS * 64}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**image_bounds),
        video_processor=Qwen3VLVideoProcessor(size=video_size, patch_size=16,
                                              temporal_patch_size=2, merge_size=2),
        tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    processor.save_pretrained(tmp)
    return _publish(tmp, out, {"random_weights": True, "seed": TINY_SEED,
                               "family": "qwen3_vl"})


def _save_random_model(model_class: Any, config: Any, ids: dict[str, int], tmp: Path) -> None:
    """Seeded random weights in float32, greedy by default, stopping on either end token."""
    import torch

    torch.manual_seed(TINY_SEED)
    model = model_class(config).to(torch.float32).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    model.save_pretrained(tmp, safe_serialization=True)


def _publish(tmp: Path, out: Path, facts: dict[str, Any]) -> Path:
    """Mark the build in ``tmp`` complete and rename it to ``out`` in one step."""
    (tmp / "tiny_model.json").write_text(json.dumps(facts))
    (tmp / ".complete").touch()
    try:
        os.replace(tmp, out)
    except OSError:
        # Another process finished first; its copy is identical.
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out

