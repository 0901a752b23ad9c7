"""Training-step throughput: our loop against one written the way the original system did it, side by side.

    python bench/train_throughput.py [--device auto|cpu|cuda] [--tile 244] [--base-channels 64] [--depth 4]
        [--batch-size 8] [--steps 20] [--warmup 3] [--tiles 32] [--peak-tflops T] [--ablate] [--levers]
        [--lever-batches 32,64] [--compile-modes default,reduce-overhead] [--json FILE]

Both loops train the same U-Net (same weights at the start) on the same tiles with the same batch size, Adam,
Gaussian NLL and gradient clipping:

- **ours**: the step of ``tune_agb.engine.train.train``: tiles from the packed store (float16), fed by
  :class:`~tune_agb.engine.data.SplitFeed` (resident on the device, and, as a second row, streamed from the store's
  memory map by the prefetch thread), normalised and flipped/transposed on the device,
  static-shape masked loss, loss sums kept on the device (no host sync per batch), bf16 autocast on CUDA, channels_last.
- **baseline**: a ``torch.utils.data.Dataset`` that ``np.load``s each tile's two files per item and normalises it
  in numpy, a ``DataLoader``, fp32, contiguous tensors; per batch the label mask is built on the CPU with numpy
  three times (loss, RMSE, MAE), the loss uses boolean indexing, and the batch metrics are read with ``.item()``.

Prints samples/s for both, the model's FLOPs per training sample (forward + backward, counted with
``torch.utils.flop_counter.FlopCounterMode``; convolutions and matmuls only), the achieved FLOP/s, and on CUDA the
share of the card's bf16 dense peak. Data: ``--input-dir/--label-dir`` in the tune_agb layout (train split), or
random tiles written to a temporary folder (14 bands, ~1 % labelled pixels along tracks, a few NaN).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from tune_agb.engine.config import TrainConfig
from tune_agb.engine.data import NormStats, SplitFeed
from tune_agb.engine.device import compile_for_training, memory_format, resolve_amp, resolve_device, tune_cuda
from tune_agb.engine.model import UNet
from tune_agb.engine.optim import build_optimizer, build_scheduler
from tune_agb.engine.train import TrainStep
from tune_agb.errors import run_cli
from tune_agb.store import DataSource

# bf16 dense tensor-core peak (TFLOP/s, no sparsity) by substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
}


def default_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS.items():  # ordered: the more specific names first
        if key in name:
            return peak
    return None


def write_random_tiles(root: Path, n: int, tile: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` random 14-band tiles with sparse track-like labels into ``root/{inputs,labels}/train``."""
    rng = np.random.default_rng(seed)
    idir, ldir = root / "inputs" / "train", root / "labels" / "train"
    idir.mkdir(parents=True)
    ldir.mkdir(parents=True)
    for i in range(n):
        img = rng.normal(0.2, 0.1, (14, tile, tile)).astype(np.float32)
        img[12:] = rng.normal(-15.0, 5.0, (2, tile, tile))
        img[:12, : tile // 8, : tile // 8] = np.nan  # a cloud gap in the optical bands
        lab = np.full((tile, tile), np.nan, np.float32)
        for col in range(int(rng.integers(0, 12)), tile, 12):  # a footprint every 2 px along tracks 12 px apart
            rows = np.arange(int(rng.integers(0, 2)), tile, 2)
            lab[rows, col] = rng.gamma(2.0, 60.0, rows.size)
        np.save(idir / f"t{i:04d}.npy", img)
        np.save(ldir / f"t{i:04d}.npy", lab)
    return root / "inputs", root / "labels"


def count_flops_per_sample(cfg: TrainConfig, tile: int, batch: int = 2) -> float:
    """Forward + backward FLOPs of one training sample, counted by torch's FlopCounterMode on the meta device
    (shapes only, nothing computed; the count does not depend on the device or the precision)."""
    model = UNet.from_config(cfg).to("meta")
    x = torch.randn(batch, cfg.in_channels, tile, tile, device="meta")
    with FlopCounterMode(display=False) as counter:
        mu, logvar = model(x)
        (mu.square().mean() + logvar.mean()).backward()
    return counter.get_total_flops() / batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(
    cfg: TrainConfig,
    norm: NormStats,
    tiles,
    device: torch.device,
    state: dict,
    steps: int,
    warmup: int,
    *,
    fused: bool | None = None,
    cudnn_benchmark: bool | None = None,
    bf16_inputs: bool = False,
    pad_channels: int = 0,
    stats: dict | None = None,
    profile: int = 0,
) -> float:
    """Samples/s of ``engine.train.TrainStep``, fed as ``train()`` feeds it (SplitFeed in ``cfg.data_mode``,
    per-pass shuffle and flip flags), with ``train()``'s CUDA choices (fused AdamW, ``cudnn.benchmark``, and
    ``cfg.compile``) unless ``fused`` / ``cudnn_benchmark`` say otherwise. ``bf16_inputs``: the split is normalised
    once and kept resident in bf16 (a lever under test; ``train()`` keeps the stored dtype and normalises per
    batch). ``pad_channels``: zero bands appended to the inputs (the model's ``in_channels``
    grows to match): the tensor-core alignment of the first convolution, under test. ``stats`` receives
    ``warmup_s`` (the warm-up steps, compilation included) and ``peak_mem_gb``; with ``profile`` > 0 also
    ``profile``: torch.profiler's table of the kernels of that many steps after the timed ones."""
    if pad_channels:
        state = {**state, "inc.0.weight": torch.nn.functional.pad(state["inc.0.weight"], (0, 0, 0, 0, 0, pad_channels))}
        cfg = cfg.replace(in_channels=cfg.in_channels + pad_channels)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    fmt = memory_format(cfg, device)
    tune_cuda(device, True if cudnn_benchmark is None else cudnn_benchmark)
    feed = SplitFeed(tiles, norm, device, cfg.data_mode)
    model = UNet.from_config(cfg).to(device)
    model.load_state_dict(state)
    model = model.to(memory_format=fmt).train()
    forward = compile_for_training(model, cfg)
    opt = build_optimizer(cfg, model.parameters(), fused=device.type == "cuda" if fused is None else fused)
    n, bs = len(feed), cfg.batch_size
    sched = build_scheduler(cfg, opt, max(1, n // bs))
    step = TrainStep(model, opt, sched, None, cfg, resolve_amp(cfg, device), device, forward)
    order, flag_rows = [], []
    while len(order) < warmup + steps:  # passes: a new order and new flip flags each, drawn as train() does
        perm = torch.randperm(n, generator=gen)
        flags = torch.rand((n, 3), generator=gen).lt(0.5) if cfg.augment else None
        for s in range(0, n - bs + 1, bs):
            order.append(perm[s : s + bs].numpy())
            flag_rows.append(flags[s : s + bs].to(device) if flags is not None else None)
    order, flag_rows = order[: warmup + steps], flag_rows[: warmup + steps]
    if bf16_inputs:
        whole = next(iter(feed.batches([np.arange(n)])))
        xs, ys = whole[0].to(torch.bfloat16), whole[1]
        every = torch.from_numpy(np.concatenate(order).astype(np.int64)).to(device)
        batches = ((xs[every[i * bs : (i + 1) * bs]], ys[every[i * bs : (i + 1) * bs]]) for i in range(len(order)))
    else:
        batches = feed.batches(order)
    if pad_channels:
        batches = ((torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad_channels)), y) for x, y in batches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t_start = time.perf_counter()
    t0 = 0.0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        step(x, y, flag_rows[i])
    step.read()  # the once-per-epoch read, and the end of the timed region
    _sync(device)
    elapsed = time.perf_counter() - t0
    if stats is not None:
        stats["warmup_s"] = t0 - t_start
        stats["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if profile and stats is not None:
        prof_batches = feed.batches(order[:profile])
        if pad_channels:
            prof_batches = ((torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad_channels)), y) for x, y in prof_batches)
        stats["profile"] = _profile_steps(step, prof_batches, flag_rows[:profile], device)
    return steps * bs / elapsed


def _profile_steps(step: TrainStep, batches, flags: list, device: torch.device) -> str:
    """torch.profiler's table of a few more steps' operators, by their own device time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i, (x, y) in enumerate(batches):
            step(x, y, flags[i])
        _sync(device)
    table = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            return table.table(sort_by=key, row_limit=30, max_name_column_width=70)
        except (AttributeError, KeyError, ValueError):
            continue
    return table.table(row_limit=30)


def measured_matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float | None:
    """bf16 dense matrix-product rate of the card, measured (random operands, the median of ``reps`` products
    timed with CUDA events after warm-up): the practical ceiling beside the datasheet's."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / float(np.median(times)) / 1e12


class NpyTileDataset(Dataset):
    """The original system's way: one ``np.load`` of the image and one of the label per item, numpy normalisation."""

    def __init__(self, input_dir: Path, label_dir: Path, names: list[str], norm: NormStats):
        self.input_dir, self.label_dir, self.names = input_dir, label_dir, names
        self.mean = np.asarray(norm.mean, np.float32)[:, None, None]
        self.std = np.asarray(norm.std, np.float32)[:, None, None]
        self.tmean, self.tstd = norm.target_mean, norm.target_std

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.load(self.input_dir / f"{self.names[i]}.npy").astype(np.float32)
        y = np.load(self.label_dir / f"{self.names[i]}.npy").astype(np.float32).reshape(x.shape[1:])
        x = np.nan_to_num((x - self.mean) / self.std)
        y = (y - self.tmean) / self.tstd
        return torch.from_numpy(x), torch.from_numpy(y)


def time_baseline(
    cfg: TrainConfig,
    norm: NormStats,
    input_dir: Path,
    label_dir: Path,
    names: list[str],
    device: torch.device,
    state: dict,
    steps: int,
    warmup: int,
    workers: int,
) -> float:
    """Samples/s of a loop written like the original system's (see the module docstring)."""
    tune_cuda(device, False)  # torch's default, as the original ran
    torch.manual_seed(cfg.seed)
    model = UNet.from_config(cfg).to(device)
    model.load_state_dict(state)
    model.train()
    opt = build_optimizer(cfg, model.parameters())
    loader = DataLoader(
        NpyTileDataset(input_dir, label_dir, names, norm),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    running: list[float] = []
    step, t0 = 0, 0.0
    while step < warmup + steps:
        for x, y in loader:
            if step == warmup:
                _sync(device)
                t0 = time.perf_counter()
            x, y = x.to(device), y.to(device)
            mu, logvar = model(x)
            y_np = y.cpu().numpy()
            mask = torch.from_numpy(~np.isnan(y_np)).to(device)  # mask 1: the loss, by boolean indexing
            m, s, t = mu[mask], logvar[mask], y[mask]
            loss = (0.5 * (s + (t - m) ** 2 * torch.exp(-s))).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            pred = mu.detach().cpu().numpy()
            mask2 = ~np.isnan(y_np)  # mask 2: RMSE of the batch
            rmse = float(np.sqrt(np.mean((pred[mask2] - y_np[mask2]) ** 2)))
            mask3 = ~np.isnan(y_np)  # mask 3: MAE of the batch
            mae = float(np.mean(np.abs(pred[mask3] - y_np[mask3])))
            running.append((loss.item(), rmse, mae))  # per-batch .item(), averaged per batch later
            step += 1
            if step == warmup + steps:
                break
    _sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def time_levers(
    args: argparse.Namespace,
    cfg: TrainConfig,
    norm: NormStats,
    tiles,
    device: torch.device,
    state: dict,
    flops: float,
    peak: float | None,
) -> list[dict]:
    """Our step (resident data) with one lever changed at a time, each timed once: its samples/s, share of the
    peak, warm-up time (torch.compile's compilation shows here) and peak device memory."""
    base = cfg.replace(data_mode="resident", compile="none")
    runs: list[tuple[str, TrainConfig, dict]] = [
        ("eager, cudnn.benchmark off, foreach Adam", base, {"fused": False, "cudnn_benchmark": False}),
        ("+ cudnn.benchmark", base, {"fused": False, "cudnn_benchmark": True}),
        ("+ fused Adam (train()'s CUDA default)", base, {}),
        ("+ bf16 resident inputs (normalised once)", base, {"bf16_inputs": True}),
    ]
    runs += [(f"train() default, batch {b}", base.replace(batch_size=b), {}) for b in _ints(args.lever_batches)]
    if args.compile_only:  # train()'s default at the main batch size, then only the compile settings
        runs = [("train() default", base, {})]
    modes = [m for m in args.compile_modes.split(",") if m]
    runs += [(f"+ compile {m}", base.replace(compile=m), {}) for m in modes]
    if "fused" in modes:  # the fused layers at every batch size tried (a new shape: compiled again, see warm-up)
        runs += [
            (f"compile fused, batch {b}", base.replace(batch_size=b, compile="fused"), {})
            for b in _ints(args.lever_batches)
        ]
    if args.variants:  # other models (FLOPs counted for each) and the first convolution's alignment
        runs += [
            ("input bands zero-padded 14 -> 16", base, {"pad_channels": 2}),
            ("upsampling transpose (other model)", base.replace(upsampling="transpose"), {}),
            ("norm group (other model)", base.replace(norm="group"), {}),
            ("norm none (other model)", base.replace(norm="none"), {}),
        ]
    if args.profile:
        runs.insert(0, ("train() default, profiled", base, {"profile": args.profile}))
        if args.compile_only:
            runs.pop(1)
        if "fused" in modes:
            runs.append(("compile fused, profiled", base.replace(compile="fused"), {"profile": args.profile}))
    rows = []
    print(f"levers (batch {cfg.batch_size} unless stated, resident data):")
    for label, c, kw in runs:
        if kw.get("bf16_inputs") and resolve_amp(c, device) != torch.bfloat16:
            print(f"  {label}: skipped (no bf16 autocast on {device.type})")
            continue
        if len(tiles) < c.batch_size:
            print(f"  {label}: skipped ({len(tiles)} tiles < batch {c.batch_size})")
            continue
        stats: dict = {}
        other = c.upsampling != cfg.upsampling or c.norm != cfg.norm
        st = UNet.from_config(c).state_dict() if other else state
        f = count_flops_per_sample(c, tiles.inputs.shape[-1]) if other else flops
        try:
            sps = time_ours(c, norm, tiles, device, st, args.steps, args.warmup, stats=stats, **kw)
        except Exception as exc:  # a lever that fails here (a compiler error, out of memory) is a result too
            print(f"  {label}: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            rows.append({"loop": label, "error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        step_s = c.batch_size / sps
        row = {
            "loop": label,
            "batch_size": c.batch_size,
            "compile": c.compile,
            "samples_per_s": sps,
            "flops_per_sample": f,
            "achieved_flops": sps * f,
            "warmup_s": stats["warmup_s"],
            "compile_s": max(0.0, stats["warmup_s"] - args.warmup * step_s),
            "peak_mem_gb": stats["peak_mem_gb"],
        }
        line = f"  {label:<48} {sps:9.2f} samples/s  {_fmt_flops(sps * f)}FLOP/s"
        if peak:
            row["share_of_bf16_peak"] = sps * f / (peak * 1e12)
            line += f"  {100 * row['share_of_bf16_peak']:5.1f} %"
        line += f"  warm-up {stats['warmup_s']:.1f} s"
        if stats["peak_mem_gb"] is not None:
            line += f"  peak {stats['peak_mem_gb']:.2f} GiB"
        print(line, flush=True)
        if "profile" in stats:
            print(stats["profile"], flush=True)
        rows.append(row)
    return rows


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _fmt_flops(f: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if f >= scale:
            return f"{f / scale:.2f} {unit}"
    return f"{f:.0f} "


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--tile", type=int, default=244, help="tile size in pixels (square)")
    p.add_argument("--base-channels", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--tiles", type=int, default=0, help="tiles to generate (default: 4 batches' worth)")
    p.add_argument("--input-dir", type=Path, help="use the train split of this INPUT_DIR instead of random tiles")
    p.add_argument("--label-dir", type=Path)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the baseline")
    p.add_argument("--peak-tflops", type=float, help="the card's bf16 dense peak (default: by device name)")
    p.add_argument("--ablate", action="store_true", help="also time ours without channels_last / augmentation")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time every loop this many times, interleaved; report the best round (least disturbed by other load)",
    )
    p.add_argument(
        "--levers",
        action="store_true",
        help="also time our step lever by lever (cudnn.benchmark, fused Adam, bf16 resident inputs, batch sizes, "
        "torch.compile modes), each once, with its warm-up (compile) time and peak device memory",
    )
    p.add_argument("--lever-batches", default="32,64", help="batch sizes tried with --levers")
    p.add_argument("--variants", action="store_true", help="with --levers: other models and padded input bands")
    p.add_argument("--profile", type=int, default=0, help="with --levers: print the operator table of N steps")
    p.add_argument(
        "--compile-modes",
        default="fused,default,reduce-overhead",
        help="compile settings tried with --levers (fused: also at every --lever-batches size)",
    )
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="no side-by-side rows; with --levers only train()'s default and the --compile-modes rows",
    )
    p.add_argument("--compile", default="none", help="the compile setting of the side-by-side rows (none, fused, ...)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = TrainConfig(
        base_channels=args.base_channels,
        depth=args.depth,
        batch_size=args.batch_size,
        optimizer="adam",
        schedule="constant",
        loss="gaussian_nll",
        grad_clip=1.0,
        norm="batch",
        compile=args.compile,
    )
    with tempfile.TemporaryDirectory(prefix="tune_agb_bench_") as tmp:
        if args.input_dir:
            input_dir, label_dir = args.input_dir, args.label_dir or args.input_dir.parent / "labels"
        else:
            n_tiles = args.tiles or 4 * args.batch_size
            input_dir, label_dir = write_random_tiles(Path(tmp), n_tiles, args.tile)
        packed = DataSource(str(input_dir), str(label_dir), splits=("train",), in_channels=cfg.in_channels).open()
        tiles = packed.tiles["train"]
        if len(tiles) < args.batch_size:
            print(f"error: {len(tiles)} tiles, fewer than one batch of {args.batch_size}", file=sys.stderr)
            return 2
        tile = tiles.inputs.shape[-1]
        norm = packed.norm(cfg.standardize_target)
        torch.manual_seed(0)
        state = UNet.from_config(cfg).state_dict()
        flops = count_flops_per_sample(cfg, tile)
        amp = resolve_amp(cfg, device)

        runs: list[tuple[str, Callable[[], float]]] = [
            (
                "baseline (np.load Dataset, CPU numpy masks x3, .item(), fp32)",
                lambda: time_baseline(
                    cfg,
                    norm,
                    input_dir / "train",
                    label_dir / "train",
                    tiles.names,
                    device,
                    state,
                    args.steps,
                    args.warmup,
                    args.workers,
                ),
            ),
            (
                f"ours (resident, {'bf16' if amp == torch.bfloat16 else 'fp32'}, "
                f"{'channels_last' if memory_format(cfg, device) == torch.channels_last else 'contiguous'}, augment)",
                lambda: time_ours(
                    cfg.replace(data_mode="resident"), norm, tiles, device, state, args.steps, args.warmup
                ),
            ),
            (
                "ours, streamed from the store (prefetch thread)",
                lambda: time_ours(cfg.replace(data_mode="stream"), norm, tiles, device, state, args.steps, args.warmup),
            ),
        ]
        if args.ablate:
            runs += [
                (
                    "ours, contiguous (no channels_last)",
                    lambda: time_ours(
                        cfg.replace(channels_last=False), norm, tiles, device, state, args.steps, args.warmup
                    ),
                ),
                (
                    "ours, no augmentation",
                    lambda: time_ours(cfg.replace(augment=False), norm, tiles, device, state, args.steps, args.warmup),
                ),
                (
                    "ours, contiguous, no augmentation",
                    lambda: time_ours(
                        cfg.replace(channels_last=False, augment=False),
                        norm,
                        tiles,
                        device,
                        state,
                        args.steps,
                        args.warmup,
                    ),
                ),
            ]
        peak = args.peak_tflops or default_peak_tflops(device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        print(
            f"device {device} ({name}, {torch.get_num_threads()} torch threads), torch {torch.__version__}; "
            f"U-Net base {cfg.base_channels} depth {cfg.depth}, {tile} px tiles, batch {cfg.batch_size}, "
            f"{len(tiles)} tiles, {args.steps} timed steps after {args.warmup} warm-up"
        )
        print(f"model FLOPs per training sample (forward + backward): {_fmt_flops(flops)}FLOP")
        # Interleave the loops round by round so that a change in machine load hits all of them alike.
        runs = [] if args.compile_only else runs
        timings: dict[str, list[float]] = {label: [] for label, _ in runs}
        for _ in range(max(1, args.repeats)):
            for label, fn in runs:
                timings[label].append(fn())
        results = []
        for label, _ in runs:
            # Best of the repeats: on a shared machine other processes only ever slow a run down.
            sps = float(max(timings[label]))
            achieved = sps * flops
            row = {"loop": label, "samples_per_s": sps, "all_samples_per_s": timings[label], "achieved_flops": achieved}
            line = f"{label:<64} {sps:9.2f} samples/s  {_fmt_flops(achieved)}FLOP/s"
            if peak:
                row["share_of_bf16_peak"] = achieved / (peak * 1e12)
                line += f"  {100 * achieved / (peak * 1e12):5.1f} % of {peak:g} TFLOP/s bf16 peak"
            if len(timings[label]) > 1:
                line += f"  (runs: {', '.join(f'{v:.2f}' for v in timings[label])})"
            print(line, flush=True)
            results.append(row)
        speedup = results[1]["samples_per_s"] / results[0]["samples_per_s"] if results else None
        if speedup:
            print(f"speed-up ours / baseline: {speedup:.2f}x")
        levers = time_levers(args, cfg, norm, tiles, device, state, flops, peak) if args.levers else []
        matmul = measured_matmul_tflops(device)
        if matmul:
            best = max([r["samples_per_s"] for r in results + levers])
            print(
                f"measured bf16 matmul ceiling (8192^3, median of 10): {matmul:.0f} TFLOP/s; best step "
                f"{best * flops / 1e12:.0f} TFLOP/s = {100 * best * flops / (matmul * 1e12):.1f} % of it"
            )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "device": str(device),
                        "device_name": name,
                        "threads": torch.get_num_threads(),
                        "tile": tile,
                        "base_channels": cfg.base_channels,
                        "depth": cfg.depth,
                        "batch_size": cfg.batch_size,
                        "steps": args.steps,
                        "flops_per_sample": flops,
                        "peak_tflops": peak,
                        "speedup": speedup,
                        "measured_matmul_tflops": matmul,
                        "runs": results,
                        "levers": levers,
                    },
                    indent=2,
                )
            )
        if speedup is not None and not math.isfinite(speedup):
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
