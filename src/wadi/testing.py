"""Tiny, offline stand-ins for real checkpoints: used by the tests, the toy demo and benchmarks.

Everything here is built from configs and word lists, never downloaded.
"""

from __future__ import annotations

import json
import string
from pathlib import Path


def build_clip_tokenizer(
    directory: str | Path, words: list[str] | tuple[str, ...] = (), max_length: int = 77
):
    """Write and load a small ``CLIPTokenizer`` (vocab.json + merges.txt).

    Every printable character is a token (so any prompt tokenizes) and every
    word of ``words`` becomes a single token through BPE merges.  The result
    loads with ``CLIPTokenizer.from_pretrained(directory)`` like SD's.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    for c in chars:
        add(c)
    for c in chars:
        add(c + "</w>")
    merges: list[str] = []
    for word in dict.fromkeys(w.lower() for w in words):
        if len(word) < 2 or not word.isascii():
            continue
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for sym in symbols[1:]:
            pair = f"{merged} {sym}"
            if pair not in merges:
                merges.append(pair)
            merged = merged + sym
            add(merged)
    add("<|startoftext|>")
    add("<|endoftext|>")
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + ("\n" if merges else "")
    )
    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(directory)
    return CLIPTokenizer.from_pretrained(directory)


# ---------------------------------------------------------------------------
# Tiny teachers: full diffusers pipeline folders built from configs, offline.
# ---------------------------------------------------------------------------

TINY_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "car", "tree", "house", "the")

#: SD's scaled-linear schedule and PixArt's linear schedule (num_train_timesteps 1000)
SD_SCHEDULE = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)
PIXART_SCHEDULE = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def _seeded(seed: int):
    import torch

    torch.manual_seed(seed)


def tiny_vae(latent_channels: int = 4, seed: int = 0):
    """An ``AutoencoderKL`` with factor 2 (latent 8 -> 16 px images), random weights."""
    from diffusers import AutoencoderKL

    _seeded(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def tiny_unet(in_channels: int = 4, sample_size: int = 8, cross_attention_dim: int = 16, seed=0):
    """A two-level ``UNet2DConditionModel`` with cross-attention, SD-like module names."""
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
    ).eval()


def tiny_clip(directory: str | Path, hidden_size: int = 16, max_length: int = 16, seed: int = 0):
    """``(CLIPTextModel, CLIPTokenizer)``: 2 layers, ``hidden_size`` wide, prompts of ``max_length``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer(Path(directory), TINY_WORDS, max_length=max_length)
    _seeded(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval(), tokenizer


def build_t5_tokenizer(directory: str | Path, words=TINY_WORDS):
    """Write and load a small ``T5Tokenizer`` (a Unigram ``tokenizer.json``), offline.

    Every printable ASCII character (with and without the word-start marker)
    is a token and each of ``words`` is one token, so any prompt tokenizes.
    """
    from transformers import T5Tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for word in dict.fromkeys(w.lower() for w in words):
        pieces.append(("▁" + word, -1.0))
    for c in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(c, -5.0), ("▁" + c, -4.0)]
    pieces = list(dict((p, s) for p, s in pieces).items())
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.save_pretrained(directory)
    return T5Tokenizer.from_pretrained(directory)


def tiny_t5(directory: str | Path, d_model: int = 16, seed: int = 0):
    """``(T5EncoderModel, T5Tokenizer)``: 2 layers, ``d_model`` wide."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_t5_tokenizer(directory)
    _seeded(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval(), tokenizer


def tiny_pixart_transformer(sample_size: int = 8, caption_channels: int = 16, seed: int = 0):
    """A 2-block ``PixArtTransformer2DModel`` with learned sigma (out_channels = 2 * in)."""
    from diffusers import PixArtTransformer2DModel

    _seeded(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12,  # inner dim 24: divisible by 3 for the resolution embedding
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=24,
        sample_size=sample_size,
        patch_size=2,
        caption_channels=caption_channels,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
    ).eval()


def _scheduler(kind: str, schedule: dict, prediction_type: str = "epsilon"):
    import diffusers

    extra = {"clip_sample": False} if kind in ("DDIMScheduler", "DDPMScheduler") else {}
    return getattr(diffusers, kind)(
        num_train_timesteps=1000, prediction_type=prediction_type, **schedule, **extra
    )


def make_tiny_sd(
    directory: str | Path,
    prediction_type: str = "epsilon",
    sample_size: int = 8,
    scheduler: str = "DDPMScheduler",
    seed: int = 0,
) -> Path:
    """A tiny ``StableDiffusionPipeline`` folder (random weights, SD's scaled-linear schedule)."""
    import tempfile

    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        text_encoder, tokenizer = tiny_clip(tmp, seed=seed)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed=seed + 1),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(sample_size=sample_size, seed=seed + 2),
        scheduler=_scheduler(scheduler, SD_SCHEDULE, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return directory


def tiny_sdxl_unet(
    sample_size: int = 8,
    cross_attention_dim: int = 40,
    pooled_dim: int = 12,
    time_embed_dim: int = 8,
    seed: int = 0,
):
    """A two-level SDXL-style ``UNet2DConditionModel``: ``text_time`` added conditioning.

    Its added embedding takes the pooled text (``pooled_dim``) and six time ids of
    ``time_embed_dim`` each, as SDXL's (1280 + 6 x 256 = 2816); the first level has no
    attention and the second two transformer layers, like SDXL's (1, 2, 10) layout.
    """
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
    ).eval()


def make_tiny_sdxl(
    directory: str | Path,
    prediction_type: str = "epsilon",
    sample_size: int = 8,
    scheduler: str = "EulerDiscreteScheduler",
    force_zeros_for_empty_prompt: bool = True,
    seed: int = 0,
) -> Path:
    """A tiny ``StableDiffusionXLPipeline`` folder (random weights, SDXL's layout and schedule).

    Two CLIP text encoders as SDXL's: ``text_encoder`` (CLIPTextModel, 16 wide) and
    ``text_encoder_2`` (CLIPTextModelWithProjection, 24 wide, pooled projection 12);
    the U-Net attends to both penultimate layers joined (16 + 24 = 40).  Like the real
    ``tokenizer_2``, the second tokenizer pads with ``"!"``.  The VAE has SDXL's
    ``scaling_factor`` 0.13025 and ``force_upcast``.
    """
    import tempfile

    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        text_encoder, tokenizer = tiny_clip(Path(tmp) / "one", hidden_size=16, seed=seed)
        tokenizer_2 = build_clip_tokenizer(Path(tmp) / "two", TINY_WORDS, max_length=16)
        tokenizer_2.pad_token = "!"
    _seeded(seed + 3)
    config_2 = CLIPTextConfig(
        vocab_size=len(tokenizer_2),
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=12,
        bos_token_id=tokenizer_2.bos_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        pad_token_id=tokenizer_2.pad_token_id,
    )
    text_encoder_2 = CLIPTextModelWithProjection(config_2).eval()
    vae = tiny_vae(seed=seed + 1)
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=tiny_sdxl_unet(sample_size=sample_size, seed=seed + 2),
        scheduler=_scheduler(scheduler, SD_SCHEDULE, prediction_type),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.save_pretrained(directory)
    return directory


def _tiny_clip_with_projection(
    directory: Path, hidden_size: int, projection_dim: int, pad_token: str | None, seed: int
):
    """``(CLIPTextModelWithProjection, CLIPTokenizer)``, 2 layers, prompts of 16 tokens."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer(directory, TINY_WORDS, max_length=16)
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    _seeded(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval(), tokenizer


def tiny_flow_vae(seed: int = 0, scaling_factor: float = 1.5305, shift_factor: float = 0.0609):
    """:func:`tiny_vae` with 16 latent channels and SD3's scaling/shift factors."""
    vae = tiny_vae(latent_channels=16, seed=seed)
    vae.register_to_config(scaling_factor=scaling_factor, shift_factor=shift_factor)
    return vae


def make_tiny_sd3(
    directory: str | Path, t5: bool = True, sample_size: int = 8, shift: float = 3.0, seed: int = 0
) -> Path:
    """A tiny ``StableDiffusion3Pipeline`` folder (random weights, SD3's layout and schedule).

    ``text_encoder`` / ``text_encoder_2``: CLIPTextModelWithProjection, 16 and 24 wide
    (projections 8 and 12, pooled 20); the second tokenizer pads with ``"!"`` as SD3's.
    ``text_encoder_3``: a 48-wide T5 (``joint_attention_dim``), left out with ``t5=False``
    (the folder then has no ``text_encoder_3``, as a T5-less SD3 export).  The VAE has 16
    latent channels and SD3's scaling/shift factors; the scheduler is flow matching with
    ``shift``.
    """
    import tempfile

    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        text_encoder, tokenizer = _tiny_clip_with_projection(Path(tmp) / "one", 16, 8, None, seed)
        text_encoder_2, tokenizer_2 = _tiny_clip_with_projection(
            Path(tmp) / "two", 24, 12, "!", seed + 3
        )
        text_encoder_3, tokenizer_3 = (None, None)
        if t5:
            text_encoder_3, tokenizer_3 = tiny_t5(Path(tmp) / "three", d_model=48, seed=seed + 4)
    _seeded(seed + 2)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        caption_projection_dim=16,
        pooled_projection_dim=20,
        pos_embed_max_size=16,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=tiny_flow_vae(seed=seed + 1),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(directory)
    return directory


def make_tiny_flux(directory: str | Path, guidance: bool = True, seed: int = 0) -> Path:
    """A tiny ``FluxPipeline`` folder (random weights, FLUX.1's layout and schedule).

    ``guidance=True``: FLUX.1-dev-like (guidance embedding, dynamic shifting with dev's
    base/max shift); ``False``: FLUX.1-schnell-like (no guidance input, static shift 1).
    ``text_encoder``: a 16-wide CLIPTextModel (pooled 16); ``text_encoder_2``: a 32-wide T5
    (``joint_attention_dim``).  One double-stream and one single-stream block, 2 heads of
    16 (rotary axes 4 + 6 + 6); the VAE has 16 latent channels and FLUX's scaling/shift.
    """
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        text_encoder, tokenizer = tiny_clip(Path(tmp) / "one", hidden_size=16, seed=seed)
        text_encoder_2, tokenizer_2 = tiny_t5(Path(tmp) / "two", d_model=32, seed=seed + 4)
    _seeded(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    if guidance:  # FLUX.1-dev's scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_flow_vae(seed=seed + 1, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(directory)
    return directory


def make_tiny_pixart(
    directory: str | Path, sample_size: int = 8, scheduler: str = "DDPMScheduler", seed: int = 0
) -> Path:
    """A tiny ``PixArtAlphaPipeline`` folder (T5 with mask, learned sigma, PixArt's linear schedule).

    ``sample_size=128`` gives a model with resolution/aspect-ratio conditioning, as the 1024 px one.
    """
    import tempfile

    from diffusers import PixArtAlphaPipeline

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        text_encoder, tokenizer = tiny_t5(tmp, seed=seed)
    pipe = PixArtAlphaPipeline(
        vae=tiny_vae(seed=seed + 1),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_pixart_transformer(sample_size=sample_size, seed=seed + 2),
        scheduler=_scheduler(scheduler, PIXART_SCHEDULE),
    )
    pipe.save_pretrained(directory)
    return directory


def make_tiny_pixel_teacher(
    directory: str | Path, channels: int = 1, sample_size: int = 8, seed: int = 0
) -> Path:
    """A tiny pixel-space teacher: ``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``, no ``vae/``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text_encoder, tokenizer = tiny_clip(directory / "tokenizer", seed=seed)
    text_encoder.save_pretrained(directory / "text_encoder")
    tiny_unet(in_channels=channels, sample_size=sample_size, seed=seed + 2).save_pretrained(
        directory / "unet"
    )
    _scheduler("DDPMScheduler", SD_SCHEDULE).save_pretrained(directory / "scheduler")
    return directory


def attach_random_adapter(
    denoiser, preset_name: str, name: str = "student", rank: int = 2, std: float = 0.3, seed=0
):
    """Attach a small LoRaD adapter (``preset_name`` at ``rank``) with random non-zero angles.

    Both factors are drawn from N(0, std^2) with a fixed seed, so the adapter
    changes the model (a freshly attached one is the identity).  Returns ``denoiser``.
    """
    import torch

    from wadi import lorad

    lorad.attach(denoiser, lorad.preset(preset_name, rank=rank), name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lorad.adapter_parameters(denoiser, name):
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return denoiser
