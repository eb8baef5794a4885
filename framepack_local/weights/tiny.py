"""Build a tiny random-weight model folder with the real layout and the real classes.

Development and CI machines cannot reach the model hub (DESIGN.md section 2), so tests load this
folder through exactly the loading code a user's download goes through. Every part is built in
code: configs mirror the real checkpoints' *structure* (channels, patching, compression, which
hidden state is used) at toy widths, and the tokenizers are byte-level BPEs whose merges are
learned here from a short embedded corpus, so arbitrary English text still tokenizes.

Output of such a model is noise: it exists to test structure, determinism, files and timings.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from pathlib import Path

from .model_folder import PROMPT_TEMPLATE

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Tiny dimensions. The relations between them mirror the real model (see DESIGN.md section 2):
#   transformer text_embed_dim        == LLaMA hidden_size          (real: 4096)
#   transformer pooled_projection_dim == CLIP text hidden_size      (real: 768, CLIP-L pooler_output)
#   transformer image_proj_dim        == SigLIP vision hidden_size  (real: 1152)
#   sum(rope_axes_dim)                == attention_head_dim         (real: 16+56+56 == 128)
# ---------------------------------------------------------------------------------------------
LLAMA_HIDDEN = 32
LLAMA_LAYERS = 4  # >= 3: the prompt embedding is hidden_states[-3] (HunyuanVideo text encoder)
LLAMA_MAX_POSITIONS = 1024  # the prompt is padded to 512 tokens (DESIGN.md section 3)
CLIP_HIDDEN = 32
CLIP_MAX_LENGTH = 77  # CLIP-L context length
SIGLIP_HIDDEN = 32
SIGLIP_IMAGE_SIZE = 32
SIGLIP_PATCH = 8  # 32/8 -> 16 image tokens (real: 384/14 -> 729)
TRANSFORMER_HEADS = 2
TRANSFORMER_HEAD_DIM = 16
TRANSFORMER_ROPE_AXES = (4, 6, 6)  # (t, h, w); sums to TRANSFORMER_HEAD_DIM like (16, 56, 56) -> 128
VAE_CHANNELS = (8, 8, 16, 16)  # 4 blocks -> 3 spatial downsamples (8x), 2 temporal (4x)
VAE_SCALING_FACTOR = 0.476986  # HunyuanVideo VAE scaling factor
BPE_MERGES_LLAMA = 320
BPE_MERGES_CLIP = 240

# Llama-3 style special tokens used by HunyuanVideo's prompt template.
LLAMA_BOS = "<|begin_of_text|>"
LLAMA_EOS = "<|end_of_text|>"
LLAMA_PAD = "<|pad|>"
LLAMA_SPECIALS = (LLAMA_BOS, LLAMA_EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", LLAMA_PAD)
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

# HunyuanVideo's prompt template up to the user's text. The real LLaMA-3 tokenizer turns it into 95
# tokens (BOS included), the `crop_start` that diffusers' HunyuanVideo pipelines hard-code; the tiny
# tokenizer learns merges until every word of it is one token, so it gives the same 95.
TEMPLATE_PREAMBLE = PROMPT_TEMPLATE.split("{}")[0]
TEMPLATE_PREAMBLE_TOKENS = 95

# Merges are learned from this text only; bytes that never occur in it still tokenize because the
# base vocabulary holds all 256 byte symbols.
_CORPUS = """\
Describe the video by detailing the following aspects: 1. The main content and theme of the video.
2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.
3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.
4. background environment, light, style and atmosphere. 5. camera angles, movements, and transitions
used in the video. A woman dances gracefully in a sunlit garden, turning slowly while her dress moves
with the wind. The camera follows her from the side and then moves closer to her face. A man walks
along the beach at sunset; waves roll onto the sand and birds fly over the water. The girl smiles,
waves her hand and looks at the camera. Leaves fall from the trees in the park as the light changes.
A cat jumps onto the table, sits down and watches the people in the room. The city street is busy
with cars and people walking under the rain; the lights reflect on the wet road. The character
raises both arms, spins around and laughs. Smoke rises from the fire and the flames move in the dark.
The astronaut floats inside the station and the earth turns behind the window. Snow is falling on
the mountain village, and a dog runs through the white field toward the house.
"""


def _learn_bpe(
    words: Counter[str], base_symbols: list[str], num_merges: int | None, end_suffix: str = ""
) -> list[tuple[str, str]]:
    """Greedy byte-pair learning with a total order on ties, so the result never depends on hashing.

    `num_merges=None` merges until every word is a single symbol.
    """
    splits: dict[str, list[str]] = {}
    for word in words:
        symbols = list(word)
        if end_suffix:
            symbols[-1] = symbols[-1] + end_suffix
        splits[word] = symbols
    merges: list[tuple[str, str]] = []
    while num_merges is None or len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            symbols = splits[word]
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merged = best[0] + best[1]
        merges.append(best)
        for word, symbols in splits.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            splits[word] = out
    return merges


def _vocab_with_merges(base: list[str], merges: list[tuple[str, str]]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for symbol in base:
        vocab.setdefault(symbol, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab


def build_llama_tokenizer():
    """A Llama-3 style byte-level BPE tokenizer (BOS prepended, header/eot specials, a pad token).

    Returned as transformers' generic fast tokenizer: in transformers 5 the class `LlamaTokenizer(Fast)`
    rebuilds any tokenizer.json as a SentencePiece-style Metaspace tokenizer, which mangles byte-level
    (Llama-3) vocabularies such as HunyuanVideo's; AutoTokenizer keeps the file's pipeline.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())

    def pieces(text: str) -> Counter[str]:
        # Special tokens are matched before pre-tokenization, so learn from the text between them.
        chunks = re.split("|".join(re.escape(s) for s in LLAMA_SPECIALS), text)
        return Counter(piece for chunk in chunks for piece, _ in pre_tokenizer.pre_tokenize_str(chunk))

    # First every word of the template becomes one token (lowest merge ranks), then general merges.
    merges = _learn_bpe(pieces(TEMPLATE_PREAMBLE), alphabet, None)
    known = set(merges)
    merges += [m for m in _learn_bpe(pieces(_CORPUS), alphabet, BPE_MERGES_LLAMA) if m not in known]
    vocab = _vocab_with_merges(alphabet, merges)

    backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in LLAMA_SPECIALS])
    bos_id = backend.token_to_id(LLAMA_BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_BOS} $A",
        pair=f"{LLAMA_BOS} $A {LLAMA_BOS} $B",
        special_tokens=[(LLAMA_BOS, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=LLAMA_BOS,
        eos_token=LLAMA_EOS,
        pad_token=LLAMA_PAD,
        # transformers 5 defaults Llama tokenizers to left padding; the packed transformer expects
        # the prompt at the start of the sequence (DESIGN.md section 2).
        padding_side="right",
        model_max_length=131072,
    )


def build_clip_tokenizer():
    """A CLIP tokenizer (lower-case, `</w>` word ends, byte-level) with max length 77."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    base = alphabet + [symbol + "</w>" for symbol in alphabet]
    # A throw-away instance provides CLIP's exact normalizer and pre-tokenizer for learning merges.
    probe = CLIPTokenizer(vocab={CLIP_BOS: 0, CLIP_EOS: 1}, merges=[]).backend_tokenizer
    normalized = probe.normalizer.normalize_str(_CORPUS)
    words = Counter(piece for piece, _ in probe.pre_tokenizer.pre_tokenize_str(normalized))
    merges = _learn_bpe(words, base, BPE_MERGES_CLIP, end_suffix="</w>")
    vocab = _vocab_with_merges(base, merges)
    vocab[CLIP_BOS] = len(vocab)  # like CLIP-L: the two specials are the last ids
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _seeded(seed: int, offset: int) -> None:
    import torch

    # One seed per part, so a part's weights do not depend on the order the parts are built in.
    torch.manual_seed(seed * 1000 + offset)


def _save_transformers_model(model, folder: Path, max_shard_size: str | None = None) -> None:
    # transformers 5 always writes safetensors.
    if max_shard_size is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=max_shard_size)


def transformer_config(text_embed_dim: int, pooled_projection_dim: int, image_proj_dim: int) -> dict:
    return dict(
        in_channels=16,
        out_channels=16,
        num_attention_heads=TRANSFORMER_HEADS,
        attention_head_dim=TRANSFORMER_HEAD_DIM,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=4.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,
        text_embed_dim=text_embed_dim,
        pooled_projection_dim=pooled_projection_dim,
        rope_theta=256.0,
        rope_axes_dim=TRANSFORMER_ROPE_AXES,
        image_condition_type=None,
        has_image_proj=True,
        image_proj_dim=image_proj_dim,
        has_clean_x_embedder=True,
    )


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=("HunyuanVideoDownBlock3D",) * len(VAE_CHANNELS),
        up_block_types=("HunyuanVideoUpBlock3D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=VAE_SCALING_FACTOR,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )


def make_tiny_model(root: Path, seed: int = 0) -> Path:
    """Write a complete tiny random-weight model folder (both transformers) to `root` and return it.

    Weights are safetensors only and byte-identical for the same seed.
    """
    from transformers.utils import logging as transformers_logging

    started = time.perf_counter()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # "Writing model shards" bars are noise here
    try:
        _build_parts(root, seed)
    finally:
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()

    (root / "source.json").write_text(
        json.dumps({"kind": "tiny-random", "seed": seed, "created_by": "framepack_local make-tiny-model"}, indent=2)
        + "\n",
        encoding="utf-8",
    )
    logger.info("Built tiny model folder %s in %.1f s", root, time.perf_counter() - started)
    return root


def _build_parts(root: Path, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        LlamaConfig,
        LlamaModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from .model_folder import siglip_image_processor_class

    tokenizer = build_llama_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_2.save_pretrained(root / "tokenizer_2")

    with torch.no_grad():
        _seeded(seed, 1)
        llama_config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=LLAMA_HIDDEN,
            intermediate_size=2 * LLAMA_HIDDEN,
            num_hidden_layers=LLAMA_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=LLAMA_HIDDEN // 2,
            max_position_embeddings=LLAMA_MAX_POSITIONS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        # Sharded like the real 4-shard text encoder, so the shard/index handling is exercised.
        _save_transformers_model(LlamaModel(llama_config), root / "text_encoder", max_shard_size="100KB")

        _seeded(seed, 2)
        clip_config = CLIPTextConfig(
            vocab_size=len(tokenizer_2),
            hidden_size=CLIP_HIDDEN,
            intermediate_size=2 * CLIP_HIDDEN,
            projection_dim=CLIP_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=tokenizer_2.bos_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            pad_token_id=tokenizer_2.pad_token_id,
        )
        _save_transformers_model(CLIPTextModel(clip_config), root / "text_encoder_2")

        _seeded(seed, 3)
        siglip_config = SiglipVisionConfig(
            hidden_size=SIGLIP_HIDDEN,
            intermediate_size=2 * SIGLIP_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=SIGLIP_IMAGE_SIZE,
            patch_size=SIGLIP_PATCH,
        )
        _save_transformers_model(SiglipVisionModel(siglip_config), root / "image_encoder")
        siglip_image_processor_class()(
            size={"height": SIGLIP_IMAGE_SIZE, "width": SIGLIP_IMAGE_SIZE},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ).save_pretrained(root / "feature_extractor")

        _seeded(seed, 4)
        AutoencoderKLHunyuanVideo(**vae_config()).save_pretrained(root / "vae", safe_serialization=True)

        for offset, folder in ((5, "transformer"), (6, "transformer_f1")):
            _seeded(seed, offset)
            model = HunyuanVideoFramepackTransformer3DModel(
                **transformer_config(LLAMA_HIDDEN, CLIP_HIDDEN, SIGLIP_HIDDEN)
            )
            # Sharded like the real 3-shard checkpoints (diffusion_pytorch_model-0000k-of-0000n).
            model.save_pretrained(root / folder, safe_serialization=True, max_shard_size="400KB")
