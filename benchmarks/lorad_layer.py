"""Forward+backward cost of one adapted Linear layer, every variant side by side.

Variants (same input, same layer shape, one run):
  frozen      plain nn.Linear, weight frozen (input gradient only)
  full        plain nn.Linear, weight trained (the floor for LoRaD: it needs dL/dW)
  lora64/256  PEFT LoRA
  dora64      PEFT DoRA
  hook        the published LoRaD: a forward hook that throws the layer's own matmul
              away and recomputes with an autograd-built rotated weight (re-created here)
  wadi        wadi's LoRaD (custom autograd Function, recompute in backward)
  merged      wadi LoRaD merged into the weight (forward only, vs frozen forward)

"kept" is the memory autograd keeps between forward and backward (bytes of saved
tensors that are not parameters), measured exactly with saved_tensors_hooks.
On CUDA, "peak" is torch.cuda.max_memory_allocated over forward+backward.

    python benchmarks/lorad_layer.py                       # CPU, small sizes
    python benchmarks/lorad_layer.py --device cuda --dtype bf16 --tokens 16384
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from published_lorad import add_hook_lorad
from wadi.lorad import LoRaDConfig, attach, merge_and_unload


def build(variant: str, width: int, device, dtype) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(width, width).to(device)
    if variant in ("frozen", "merged"):
        base.requires_grad_(False)
        if variant == "merged":
            model = nn.Sequential(base)
            attach(model, LoRaDConfig(rank=64), "a")
            return merge_and_unload(model, "a")[0].to(dtype)
        return base.to(dtype)
    if variant == "full":
        return base.to(dtype)
    if variant.startswith(("lora", "dora")):
        from peft import LoraConfig, get_peft_model

        rank = int(variant[4:])
        wrapper = nn.Sequential()
        wrapper.add_module("layer", base)
        cfg = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=["layer"], use_dora=variant.startswith("dora")
        )
        model = get_peft_model(wrapper, cfg)
        model.to(dtype)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()  # adapters in fp32 as a mixed-precision run keeps them
        return model
    if variant == "hook":
        base.requires_grad_(False)
        base.to(dtype)
        add_hook_lorad(base, 64)
        return base
    if variant == "wadi":
        model = nn.Sequential(base.to(dtype))
        attach(model, LoRaDConfig(rank=64))
        return model
    raise ValueError(variant)


def kept_bytes(model: nn.Module, x: torch.Tensor, autocast_dtype) -> int:
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params and t.data_ptr() != x.data_ptr():
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(x, autocast_dtype):
        model(x)
    return total


def _autocast(x, dtype):
    return torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None)


def step(model, x, autocast_dtype, backward=True):
    with _autocast(x, autocast_dtype):
        y = model(x)
    if backward:
        y.float().square().mean().backward()
    return y


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(variants, width, tokens, device, dtype, reps):
    torch.manual_seed(0)
    autocast_dtype = dtype if dtype != torch.float32 else None
    models = {v: build(v, width, device, dtype) for v in variants}
    x = torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True)
    times = {v: [] for v in variants}
    for _ in range(2):  # warm-up
        for v, m in models.items():
            step(m, x, autocast_dtype, backward=v != "merged")
    for _ in range(reps):  # interleaved rounds: noise hits every variant alike
        for v, m in models.items():
            sync(device)
            t0 = time.perf_counter()
            step(m, x, autocast_dtype, backward=v != "merged")
            sync(device)
            times[v].append(time.perf_counter() - t0)
            m.zero_grad(set_to_none=True)
            x.grad = None
    frozen_fwd = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            step(models["frozen"], x, autocast_dtype, backward=False)
        sync(device)
        frozen_fwd.append(time.perf_counter() - t0)
    rows = {}
    for v, m in models.items():
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            step(m, x, autocast_dtype, backward=v != "merged")
            peak = torch.cuda.max_memory_allocated() - base_mem
            m.zero_grad(set_to_none=True)
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        rows[v] = dict(
            ms=statistics.median(times[v]) * 1e3,
            kept=kept_bytes(m, x, autocast_dtype) if v != "merged" else 0,
            peak=peak,
            trainable=trainable,
        )
    rows["merged"]["vs_plain_forward"] = rows["merged"]["ms"] / (
        statistics.median(frozen_fwd) * 1e3
    )
    return rows


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--widths", default="320,640,1280")
    parser.add_argument(
        "--tokens", type=int, default=None, help="rows of x (default: 1024 CPU, 16384 GPU)"
    )
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--variants", default="frozen,full,lora64,lora256,dora64,hook,wadi,merged")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tokens = args.tokens or (16384 if device.type == "cuda" else 1024)
    reps = args.reps or (50 if device.type == "cuda" else 15)
    variants = args.variants.split(",")
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"# device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"# dtype {args.dtype}, tokens {tokens}, reps {reps}, LoRaD rank 64 (hook and wadi)")
    for width in [int(w) for w in args.widths.split(",")]:
        rows = measure(variants, width, tokens, device, dtype, reps)
        full, hook = rows["full"]["ms"], rows["hook"]["ms"]
        print(f"\n## Linear {width} -> {width}")
        head = "| variant | fwd+bwd ms | vs full | vs hook | kept for backward MiB | trainable |"
        if device.type == "cuda":
            head += " peak MiB |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for v, r in rows.items():
            ms_label = "fwd ms" if v == "merged" else ""
            line = (
                f"| {v}{' (' + ms_label + ')' if ms_label else ''} | {r['ms']:.3f} | {r['ms'] / full:.2f}x | "
                f"{r['ms'] / hook:.2f}x | {r['kept'] / 2**20:.2f} | {r['trainable']:,} |"
            )
            if device.type == "cuda":
                line += f" {r['peak'] / 2**20:.1f} |"
            print(line)
        w = rows["wadi"]
        print(
            f"wadi/full {w['ms'] / full:.3f}x (target <= 1.05), wadi/hook {w['ms'] / hook:.3f}x "
            f"(target <= 0.80), kept hook-wadi {(rows['hook']['kept'] - w['kept']) / 2**20:.2f} MiB, "
            f"merged fwd / plain fwd {rows['merged']['vs_plain_forward']:.3f}x"
        )


if __name__ == "__main__":
    main()
