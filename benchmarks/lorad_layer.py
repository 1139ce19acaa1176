"""Forward+backward cost of one adapted Linear layer, every variant side by side.

Variants (same input, same layer shape, one run):
  frozen      plain nn.Linear, weight frozen (input gradient only)
  full        plain nn.Linear, weight trained (the floor for LoRaD: it needs dL/dW)
  lora64/256  PEFT LoRA
  dora64      PEFT DoRA
  hook        the published LoRaD: a forward hook that throws the layer's own matmul
              away and recomputes with an autograd-built rotated weight (re-created here)
  wadi        wadi's LoRaD (custom autograd Function, recompute in backward)
  wadi_keep   wadi's LoRaD with keep_angles: the rotated weight is kept for backward
  wadi@REV    wadi's LoRaD Function as of git revision REV (--baseline-rev), same run
  merged      wadi LoRaD merged into the weight (forward only, vs frozen forward)
  cached      wadi LoRaD, no-grad forward with the rotation cache on (forward only)

"kept" is the memory autograd keeps between forward and backward (bytes of saved
tensors that are not parameters), measured exactly with saved_tensors_hooks.
On CUDA, "peak" is torch.cuda.max_memory_allocated over forward+backward.
``--clock cpu`` times with the process's CPU time instead of wall time: on a
shared CPU box it leaves out the time other jobs hold the core.

    python benchmarks/lorad_layer.py                       # CPU, small sizes
    python benchmarks/lorad_layer.py --device cuda --dtype bf16 --tokens 16384
    OMP_NUM_THREADS=1 python benchmarks/lorad_layer.py --clock cpu --baseline-rev HEAD~3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
import types
from pathlib import Path

import torch
from torch import nn

from published_lorad import add_hook_lorad
from wadi.lorad import LoRaDConfig, attach, merge_and_unload
from wadi.lorad.layer import set_keep_angles, set_rotation_cache

FORWARD_ONLY = ("merged", "cached")


def load_function_at(rev: str):
    """``LoRaDLinearFunction`` from ``src/wadi/lorad/functional.py`` at git revision ``rev``."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:src/wadi/lorad/functional.py"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType(f"wadi_functional_{rev}")
    exec(compile(source, f"functional.py@{rev}", "exec"), module.__dict__)
    return module.LoRaDLinearFunction


class FunctionAt(nn.Module):
    """An adapted Linear calling another revision's ``LoRaDLinearFunction`` (its 6-argument form)."""

    def __init__(self, base: nn.Linear, rank: int, fn) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.fn = fn
        out_f, in_f = base.weight.shape
        self.lorad_A = nn.Parameter(torch.zeros(out_f, rank, device=base.weight.device))
        self.lorad_B = nn.Parameter(torch.empty(rank, in_f // 2, device=base.weight.device))
        nn.init.xavier_uniform_(self.lorad_B)

    def forward(self, x):
        w = self.base.weight
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled() else w.dtype
        return self.fn.apply(x, w, self.base.bias, self.lorad_A, self.lorad_B, dtype)


def build(variant: str, width: int, device, dtype, baseline=None) -> nn.Module:
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
    if variant in ("wadi", "wadi_keep", "cached"):
        model = nn.Sequential(base.to(dtype))
        attach(model, LoRaDConfig(rank=64))
        set_keep_angles(model, variant == "wadi_keep")
        set_rotation_cache(model, variant == "cached")
        return model
    if variant.startswith("wadi@"):
        return FunctionAt(base.to(dtype), 64, baseline).to(device)
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
    with torch.set_grad_enabled(backward), _autocast(x, autocast_dtype):
        y = model(x)
    if backward:
        y.float().square().mean().backward()
    return y


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(variants, width, tokens, device, dtype, reps, clock=time.perf_counter, baseline=None):
    torch.manual_seed(0)
    autocast_dtype = dtype if dtype != torch.float32 else None
    models = {v: build(v, width, device, dtype, baseline) for v in variants}
    x = torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True)
    times = {v: [] for v in variants}
    times["frozen fwd"] = []
    rounds = [(v, m, v not in FORWARD_ONLY) for v, m in models.items()]
    rounds.append(("frozen fwd", models["frozen"], False))
    for _ in range(2):  # warm-up
        for _, m, backward in rounds:
            step(m, x, autocast_dtype, backward=backward)
    for _ in range(reps):  # interleaved rounds: noise hits every variant alike
        for v, m, backward in rounds:
            sync(device)
            t0 = clock()
            step(m, x, autocast_dtype, backward=backward)
            sync(device)
            times[v].append(clock() - t0)
            m.zero_grad(set_to_none=True)
            x.grad = None
    rows = {}
    for v, m in models.items():
        peak = None
        backward = v not in FORWARD_ONLY
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            step(m, x, autocast_dtype, backward=backward)
            peak = torch.cuda.max_memory_allocated() - base_mem
            m.zero_grad(set_to_none=True)
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        rows[v] = dict(
            ms=statistics.median(times[v]) * 1e3,
            kept=kept_bytes(m, x, autocast_dtype) if backward else 0,
            peak=peak,
            trainable=trainable,
        )
    plain_forward = statistics.median(times["frozen fwd"]) * 1e3
    for v in FORWARD_ONLY:
        if v in rows:
            rows[v]["vs_plain_forward"] = rows[v]["ms"] / plain_forward
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
    parser.add_argument(
        "--variants",
        default="frozen,full,lora64,lora256,dora64,hook,wadi,wadi_keep,merged,cached",
        help="comma-separated; frozen, full, hook and wadi are always measured",
    )
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    parser.add_argument(
        "--baseline-rev",
        default=None,
        help="also time the LoRaD Function of this git revision (variant wadi@REV)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tokens = args.tokens or (16384 if device.type == "cuda" else 1024)
    reps = args.reps or (50 if device.type == "cuda" else 15)
    variants = args.variants.split(",")
    for needed in ("frozen", "full", "hook", "wadi"):
        if needed not in variants:
            variants.insert(0, needed)
    baseline = None
    if args.baseline_rev:
        baseline = load_function_at(args.baseline_rev)
        variants.insert(variants.index("wadi"), f"wadi@{args.baseline_rev}")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"# device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"# dtype {args.dtype}, tokens {tokens}, reps {reps}, clock {args.clock}, "
        "LoRaD rank 64 (hook and wadi)"
    )
    for width in [int(w) for w in args.widths.split(",")]:
        rows = measure(variants, width, tokens, device, dtype, reps, clock, baseline)
        full, hook = rows["full"]["ms"], rows["hook"]["ms"]
        print(f"\n## Linear {width} -> {width}")
        head = "| variant | fwd+bwd ms | vs full | vs hook | kept for backward MiB | trainable |"
        if device.type == "cuda":
            head += " peak MiB |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for v, r in rows.items():
            ms_label = "fwd ms" if v in FORWARD_ONLY else ""
            line = (
                f"| {v}{' (' + ms_label + ')' if ms_label else ''} | {r['ms']:.3f} | {r['ms'] / full:.2f}x | "
                f"{r['ms'] / hook:.2f}x | {r['kept'] / 2**20:.2f} | {r['trainable']:,} |"
            )
            if device.type == "cuda":
                line += f" {r['peak'] / 2**20:.1f} |"
            print(line)
        w = rows["wadi"]
        summary = (
            f"wadi/full {w['ms'] / full:.3f}x (target <= 1.05), wadi/hook {w['ms'] / hook:.3f}x "
            f"(target <= 0.80), kept hook-wadi {(rows['hook']['kept'] - w['kept']) / 2**20:.2f} MiB"
        )
        if "wadi_keep" in rows:
            keep = rows["wadi_keep"]
            summary += (
                f", wadi_keep/full {keep['ms'] / full:.3f}x keeping {keep['kept'] / 2**20:.2f} MiB"
            )
        for v in FORWARD_ONLY:
            if v in rows:
                summary += f", {v} fwd / plain fwd {rows[v]['vs_plain_forward']:.3f}x"
        print(summary)


if __name__ == "__main__":
    main()
