"""The toy digits teacher: a pixel-space text-conditional U-Net, its configs, training and saving.

The teacher is a standard diffusers folder (``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, ``model_index.json``; no ``vae/``: latents are pixels), so it loads through the
same loader as Stable Diffusion. The text encoder is trained jointly with the U-Net: with only
a few thousand steps of budget, letting the encoder place "7", "seven" and "digit 7" close
together is cheaper than asking the U-Net's cross-attention to learn eight unrelated codes.

The shipped ``assets/teacher`` was trained in two stages (1 CPU thread, about 30 minutes)::

    wadi toy train-teacher --out stage1 --steps 1200 --batch-size 48 --lr 1e-3 --seed 0 --threads 1
    wadi toy train-teacher --out teacher --init-from stage1 --steps 1000 --batch-size 48 \
        --lr 5e-4 --seed 1 --threads 1

``assets/teacher-attn`` (transformer blocks at the 16x16 level too, as SD has at its full
resolution; 1.08M U-Net parameters, 45 minutes on 1 thread)::

    wadi toy train-teacher --out teacher-attn --steps 2000 --batch-size 48 --lr 1e-3 --seed 0 \
        --threads 1 --full-res-attention
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data import IMAGE_SIZE, load_digits_split
from .prompts import MAX_TOKENS, TEMPLATES, build_tokenizer, prompt_for

TEXT_HIDDEN = 64


def unet_config(
    block_out_channels: tuple[int, ...] = (32, 64), full_res_attention: bool = False
) -> dict:
    """SD-like U-Net at 16x16, one channel: cross-attention at the 8x8 level and in the middle,
    and with ``full_res_attention`` also at the 16x16 level (as SD has at its 64x64 one)."""
    levels = len(block_out_channels)
    first = "CrossAttnDownBlock2D" if full_res_attention else "DownBlock2D"
    down = (first,) + ("CrossAttnDownBlock2D",) * (levels - 1)
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=tuple(
            "CrossAttnUpBlock2D" if d.startswith("CrossAttn") else "UpBlock2D" for d in down[::-1]
        ),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def text_encoder_config(tokenizer) -> dict:
    """A 2-layer, 64-wide CLIP text encoder over the toy vocabulary."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def scheduler_config() -> dict:
    """SD's 1000-step scaled-linear schedule, eps prediction."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


@dataclass
class TeacherTrainConfig:
    """Everything that decides the trained teacher (saved as ``training_config.json``)."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    null_prompt_prob: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    block_out_channels: tuple[int, ...] = (32, 64)
    full_res_attention: bool = False  # transformer blocks at the 16x16 level too
    init_from: str | None = None  # continue from this teacher folder's weights (a second stage)

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size must be at least 1")
        if not 0.0 <= self.null_prompt_prob < 1.0:
            raise ValueError("null prompt probability must be in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("EMA decay must be in [0, 1)")


def build_teacher(tokenizer_dir: str | Path, config: TeacherTrainConfig | None = None):
    """Fresh (unet, text_encoder, tokenizer, scheduler); the tokenizer is written to ``tokenizer_dir``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = config or TeacherTrainConfig()
    tokenizer = build_tokenizer(tokenizer_dir)
    unet = UNet2DConditionModel(**unet_config(config.block_out_channels, config.full_res_attention))
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(tokenizer)))
    return unet, text_encoder, tokenizer, DDPMScheduler(**scheduler_config())


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length, as SD's pipeline does."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """(B, L, D) last hidden states, SD-style (no attention mask)."""
    device = next(text_encoder.parameters()).device
    return text_encoder(tokenize(tokenizer, prompts).to(device))[0]


def save_teacher(
    directory: str | Path, unet, text_encoder, tokenizer, scheduler, extra=None
) -> Path:
    """Write the diffusers-style teacher folder atomically (temporary folder, then rename)."""
    import diffusers

    from wadi.files import atomic_directory

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "tokenizer")
        scheduler.save_pretrained(tmp / "scheduler")
        # not a StableDiffusionPipeline (no vae): a plain index of the parts for wadi's loader
        index = {
            "_class_name": "WadiPixelTeacher",
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDPMScheduler"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if extra:
            (tmp / "training_config.json").write_text(json.dumps(extra, indent=2) + "\n")
    return directory


def _lr_factor(step: int, config: TeacherTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_teacher(
    out: str | Path, config: TeacherTrainConfig | None = None, progress: bool = True
) -> dict:
    """Train the digits teacher and save it to ``out``; returns a summary (loss, seconds).

    Each sample gets a random prompt template for its digit; ``null_prompt_prob`` of them get
    the empty prompt so the teacher supports classifier-free guidance. The EMA weights ship.
    """
    from tqdm.auto import tqdm

    config = config or TeacherTrainConfig()
    config.validate()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    train_x, train_y, _, _ = load_digits_split()

    with tempfile.TemporaryDirectory() as tok_dir:
        unet, text_encoder, tokenizer, scheduler = build_teacher(tok_dir, config)
        previous = None
        if config.init_from:
            unet, text_encoder, _, _ = load_teacher_parts(config.init_from)
            config_file = Path(config.init_from) / "training_config.json"
            if config_file.is_file():
                previous = json.loads(config_file.read_text())
        # table of token ids: row 10*template + digit, last row the empty prompt
        prompts = [prompt_for(d, t) for t in range(len(TEMPLATES)) for d in range(10)] + [""]
        table = tokenize(tokenizer, prompts)
    null_row = len(prompts) - 1

    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    abar = scheduler.alphas_cumprod.to(torch.float32)

    unet.train()
    text_encoder.train()
    start = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="teacher", disable=not progress)
    for _step in bar:
        idx = torch.randint(0, len(train_x), (config.batch_size,), generator=gen)
        x0, y = train_x[idx], train_y[idx]
        template = torch.randint(0, len(TEMPLATES), (config.batch_size,), generator=gen)
        rows = template * 10 + y
        drop = torch.rand(config.batch_size, generator=gen) < config.null_prompt_prob
        rows = torch.where(drop, torch.full_like(rows, null_row), rows)
        t = torch.randint(0, len(abar), (config.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps

        cond = text_encoder(table[rows])[0]
        loss = torch.nn.functional.mse_loss(unet(x_t, t, cond).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - config.ema_decay)
        losses.append(loss.item())
        if _step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    seconds = time.perf_counter() - start

    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    summary = {
        "config": {**asdict(config), "block_out_channels": list(config.block_out_channels)},
        "final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "train_seconds": round(seconds, 1),
        "init_from_summary": previous,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    save_teacher(out, unet, text_encoder, tokenizer, scheduler, extra=summary)
    return summary


def load_teacher_parts(directory: str | Path):
    """(unet, text_encoder, tokenizer, scheduler) from a teacher folder, with diffusers' loaders."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not (directory / part).is_dir():
            raise FileNotFoundError(f"teacher folder {directory} has no {part}/")
    unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(directory, subfolder="text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(directory, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(directory, subfolder="scheduler")
    return unet, text_encoder, tokenizer, scheduler
