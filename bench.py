"""How fast VideoMAE trains and loads clips, each figure beside a baseline timed in the same run.

    python bench.py                          # ViT-S, batch 2, 16x224, CPU fp32, then the data rows
    python bench.py --dtype bf16             # adds ours bf16 / ours fp32, a bf16-vs-fp32 loss check
    python bench.py --decoder_mask run_cell  # VideoMAE V2 decoder masking against HF's full decoder
    python bench.py --device cuda --model base --batch 32 --dtype bf16 --compile --skip_data
    python bench.py --smoke                  # every row at toy sizes, in well under a minute

Model rows: forward + backward + AdamW step (fused where torch has it) of our VideoMAE and of
transformers' VideoMAEForPreTraining built to the same sizes, on the same clip and tube mask, and of
our fine-tuning classifier. TFLOP/s count training matmul FLOPs (model.VideoMAE.flops_per_clip); MFU
divides them by a square matmul's speed in the same dtype, measured in the same run (on a GPU fp32
means TF32 matmuls, as pretrain.py trains), and on known GPUs in bf16 by the datasheet's dense peak
too (H100, H200: 989 TFLOP/s). Memory is the peak of a step above what was allocated before it
(weights, AdamW state, input), median of up to 3 steps: torch.cuda.max_memory_allocated on a GPU; on
a Linux CPU the resident high-water mark (VmHWM, reset through /proc/self/clear_refs after glibc's
malloc_trim has handed freed memory back), which also counts memory the allocator keeps cached.

Data rows: 16-frame clips at stride 4, cropped to 224, from UCF101-like videos written once into
data/bench/ (320x240 XVID, 25 fps, 7 s). In one process on one thread: the decoder's floor (seek,
then grab() the 61 frames a clip spans, nothing converted to pixels), the reference code's way
(decord, PIL crop and bilinear resize, float and ImageNet normalisation), data.VideoDataset with 1
and 2 clips per decode; then VideoDataset through a DataLoader with 1 and --workers processes.

Every figure is the median of --reps timed repetitions after --warmup untimed ones. The contenders
of a comparison take turns within each repetition, so a slow spell of a shared machine slows them
alike.
"""
import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import data
import mask as masks
import model as models
from engine import autocast
from model import param_groups

RATE = 4  # sampling rate: frames between a clip's frames
# Dense bf16 peaks of NVIDIA's datasheets, TFLOP/s, by a part of the GPU's name (the first match)
DATASHEET_BF16 = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312}


def race(contenders, reps, warmup, sync=lambda: None):
    """Median seconds of each callable, run in turns: `warmup` untimed rounds, then `reps` timed
    ones; the order rotates each round, so none always runs first or right after the same other."""
    names, times = list(contenders), {k: [] for k in contenders}
    for r in range(warmup + reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t = time.perf_counter()
            contenders[name]()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def step_peak_mb(step, device):
    """Peak MB of one `step` call above what was allocated before it; None where not measurable."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        ctypes.CDLL(None).malloc_trim(0)  # freed pages back to the kernel: resident = live memory
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # high-water mark := current resident size
        before = _status_kb("VmRSS")
    except (OSError, AttributeError):  # not Linux with glibc
        return None
    step()
    return (_status_kb("VmHWM") - before) / 1024


def with_adamw(net):
    groups = param_groups(net, weight_decay=0.05)
    try:
        return net, torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95), fused=True)
    except RuntimeError:  # no fused kernel for this device
        return net, torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95))


def build_ours(args, device, kind="pretrain"):
    torch.manual_seed(0)
    net = models.build_model(kind, args.model, img_size=args.size, num_frames=args.frames)
    return with_adamw(net.to(device))


def build_hf(args, device):
    """transformers' VideoMAEForPreTraining with our preset's sizes; None without transformers."""
    try:
        from transformers import VideoMAEConfig, VideoMAEForPreTraining
    except ImportError:
        return None
    p = models.PRESETS[args.model]
    config = VideoMAEConfig(
        image_size=args.size, num_frames=args.frames, patch_size=16, tubelet_size=2,
        hidden_size=p["embed_dim"], num_hidden_layers=p["depth"],
        num_attention_heads=p["num_heads"], intermediate_size=4 * p["embed_dim"],
        decoder_hidden_size=p["decoder_embed_dim"], decoder_num_hidden_layers=p["decoder_depth"],
        decoder_num_attention_heads=p["decoder_num_heads"],
        decoder_intermediate_size=4 * p["decoder_embed_dim"], norm_pix_loss=True,
        use_mean_pooling=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return with_adamw(VideoMAEForPreTraining(config).to(device))


def train_step(loss_fn, opt, dtype, device):
    """step(mask) -> loss: forward (under autocast for bf16), backward, optimizer step."""
    amp = autocast(SimpleNamespace(dtype=dtype), SimpleNamespace(device=device))

    def step(mask):
        with amp:
            loss = loss_fn(mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def row(rows, name, value, target=None, met=None, **numbers):
    rows.append(dict(name=name, value=value, target=target, met=met, **numbers))


def ratio_row(rows, name, value, limit, at_least, judged):
    met = (value >= limit if at_least else value <= limit) if judged and limit else None
    target = limit and f"{'>=' if at_least else '<='} {limit}"
    row(rows, name, f"{value:.3g}", target, met, ratio=value)


def model_rows(args, device, sync, rows):
    B, T, S, judged = args.batch, args.frames, args.size, not args.smoke
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (B, T, S, S, 3), dtype=torch.uint8, generator=g)
    video = data.normalize(clips).to(device)
    net, opt = build_ours(args, device)
    grid = net.encoder.grid
    mask = masks.tube_mask(B, grid, args.mask_ratio, g).to(device)
    run_cell = args.decoder_mask == "run_cell"
    dmask = masks.running_cell_mask(B, grid, 0.5, g).to(device) if run_cell else None
    n_hidden = masks.hidden_per_clip("tube", grid, args.mask_ratio)  # (fixed shapes: one graph)
    counts = dict(num_hidden=n_hidden, num_not_rebuilt=masks.hidden_per_clip("run_cell", grid, 0.5))
    ours = torch.compile(net) if args.compile else net
    # bf16 and fp32 steps share one model
    dtypes = [args.dtype] + (["fp32"] if args.dtype == "bf16" else [])
    steps = {f"ours {d}": train_step(lambda m: ours(video, m, dmask, **counts)[0], opt, d, device)
             for d in dtypes}
    vit, vit_opt = build_ours(args, device, "finetune")  # fine-tuning: every token, 400 classes
    classify = torch.compile(vit) if args.compile else vit
    labels = torch.arange(B, device=device) % 400
    steps[f"finetune {args.dtype}"] = train_step(lambda m: F.cross_entropy(classify(video), labels),
                                                 vit_opt, args.dtype, device)
    hf = build_hf(args, device)
    if hf:
        hf_video = video.transpose(1, 2).contiguous()
        hf_net = torch.compile(hf[0]) if args.compile else hf[0]
        steps[f"HF {args.dtype}"] = train_step(
            lambda m: hf_net(pixel_values=hf_video, bool_masked_pos=m).loss,
            hf[1], args.dtype, device)
    if device.type == "cuda":
        n = 8192
    elif args.smoke:
        n = 512
    else:
        n = 2048
    mats = {d: torch.randn(2, n, n, device=device,
                           dtype=torch.bfloat16 if d == "bf16" else torch.float32)
            for d in dtypes}
    contenders = {f"matmul {d}": (lambda a=a: a[0] @ a[1]) for d, a in mats.items()}
    contenders.update({k: (lambda s=s: s(mask)) for k, s in steps.items()})
    t = race(contenders, args.reps, args.warmup, sync)

    peak = {d: 2 * n**3 / t[f"matmul {d}"] / 1e12 for d in dtypes}
    for d in dtypes:
        row(rows, f"matmul peak {d} ({n}x{n})", f"{peak[d]:.3f} TFLOP/s", tflops=peak[d])
    n_visible = math.prod(grid) - n_hidden
    n_pred = n_hidden if dmask is None else int((~dmask[0]).sum())
    flops = {"ours": net.flops_per_clip(n_visible, n_pred),
             "HF": net.flops_per_clip(n_visible, n_hidden),
             "finetune": 3 * vit.flops(math.prod(grid))}  # (the head's: negligible)
    tag = f"{args.model} {B}x{T}x{S}" + ", compiled" * args.compile
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    datasheet = next((v for k, v in DATASHEET_BF16.items() if k in gpu), None)
    mem = {}
    for name, step in steps.items():
        who, d = name.split()
        peaks = [step_peak_mb(lambda: step(mask), device) for _ in range(min(args.reps, 3))]
        mem[name] = None if None in peaks else statistics.median(peaks)
        tf = flops[who] * B / t[name] / 1e12
        decoder = {"ours": args.decoder_mask, "HF": "full"}.get(who)
        what = f"mask {args.mask_ratio}, decoder {decoder}" if decoder else "every token"
        peak_text = "n/a" if mem[name] is None else f"+{mem[name]:.0f} MB"
        sheet = datasheet if d == "bf16" else None  # (TF32 and CPUs: the measured peak only)
        sheet_text = f" ({tf / sheet:.0%} of the datasheet's {sheet})" if sheet else ""
        row(rows, f"step {name} ({tag}, {what})",
            f"{t[name] * 1e3:.0f} ms  {B / t[name]:.2f} clips/s  {tf:.3f} TFLOP/s  "
            f"MFU {tf / peak[d]:.0%}{sheet_text}  peak {peak_text}",
            ms=t[name] * 1e3, clips_per_s=B / t[name], tflops=tf, mfu=tf / peak[d],
            mfu_datasheet=sheet and tf / sheet, peak_mb=mem[name])

    ours_hf = f"ours {args.dtype} / HF {args.dtype} step time"
    if dmask is not None:
        limit = 0.60
        ours_hf += " (ours run_cell 0.5, HF full decoder)"
    elif args.dtype == "fp32" and not args.compile:
        limit = 0.95
    else:
        limit = None
    if not hf:
        for name in (f"step HF {args.dtype} ({tag})", ours_hf, "peak memory ours / HF"):
            row(rows, name, "skipped: pip install transformers")
    else:
        ours_name, hf_name = f"ours {args.dtype}", f"HF {args.dtype}"
        ratio_row(rows, ours_hf, t[ours_name] / t[hf_name], limit, False, judged)
        if mem[hf_name] is None:
            row(rows, "peak memory ours / HF", "n/a: needs Linux and glibc, or CUDA")
        else:
            ratio_row(rows, "peak memory ours / HF", mem[ours_name] / mem[hf_name], 1.0, False,
                      judged)
    if args.dtype == "bf16":
        ratio_row(rows, "ours bf16 / ours fp32 step time", t["ours bf16"] / t["ours fp32"], 0.55,
                  False, judged)
        step_masks = [masks.tube_mask(B, grid, args.mask_ratio, g).to(device) for _ in range(5)]
        gap = loss_gap(args, device, video, step_masks, dmask)
        ratio_row(rows, "bf16 vs fp32 loss, 5 steps from one init: max |diff| / loss", gap, 0.01,
                  False, judged)


def loss_gap(args, device, video, step_masks, dmask):
    """Largest relative loss gap of an fp32 and a bf16 run from the same init on the same data."""
    curves = []
    for dtype in ("fp32", "bf16"):
        net, opt = build_ours(args, device)
        step = train_step(lambda m: net(video, m, dmask)[0], opt, dtype, device)
        curves.append([step(m).item() for m in step_masks])
    return max(abs(b - f) / f for f, b in zip(*curves))


def write_video(path, rng, num_frames, W, H):
    """Textured shapes bouncing over a textured, slowly panning background, with sensor noise: XVID,
    25 fps."""
    def texture(h, w):
        small = rng.integers(0, 256, (h // 12 + 2, w // 12 + 2, 3), dtype=np.uint8)
        blotches = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        return np.clip(blotches + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.float32)
    pan = 0.4  # background pixels per frame
    background = texture(H, W + int(pan * num_frames) + 2)
    shapes = []
    for _ in range(rng.integers(3, 7)):
        s = int(rng.integers(H // 8, H // 3))
        alpha = np.zeros((s, s), np.float32)
        if rng.random() < 0.5:
            cv2.ellipse(alpha, (s // 2, s // 2), (s // 2 - 1, int(rng.integers(s // 4, s // 2))),
                        float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            cv2.fillPoly(alpha, [rng.integers(0, s, (5, 2), dtype=np.int32)], 1)
        shapes.append((texture(s, s), alpha[..., None], rng.uniform(0, (W - s, H - s)),
                       rng.uniform(-3, 3, 2)))
    part = path.with_suffix(".part.avi")
    writer = cv2.VideoWriter(str(part), cv2.VideoWriter_fourcc(*"XVID"), 25, (W, H))
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write XVID video here; the data rows need it")
    for t in range(num_frames):
        frame = cv2.getRectSubPix(background, (W, H), (W / 2 + pan * t, H / 2))
        for tex, alpha, pos, vel in shapes:
            s = tex.shape[0]
            pos += vel
            vel[(pos < 0) | (pos > (W - s, H - s))] *= -1  # bounce off the borders
            np.clip(pos, 0, (W - s, H - s), out=pos)
            x, y = pos.astype(int)
            frame[y:y + s, x:x + s] = tex * alpha + frame[y:y + s, x:x + s] * (1 - alpha)
        writer.write(np.clip(frame + rng.normal(0, 1.5, frame.shape), 0, 255).astype(np.uint8))
    writer.release()
    part.replace(path)


def bench_videos(folder, count, num_frames, W, H):
    """Paths of `count` generated videos in `folder`, written on first use."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"bench_{k:02d}_{W}x{H}_{num_frames}f.avi" for k in range(count)]
    for k, p in enumerate(paths):
        if not p.is_file():
            write_video(p, np.random.default_rng(k), num_frames, W, H)
    return [str(p) for p in paths]


def reference_clip(path, T, size, rng):
    """The reference's pre-training read: decord, PIL crop + bilinear resize, float, normalised."""
    import decord
    from PIL import Image
    vr = decord.VideoReader(path, num_threads=1)
    frames = vr.get_batch(data.clip_indices(len(vr), "pretrain", T, RATE, rng=rng)[0]).asnumpy()
    x, y, w, h = data.multiscale_crop_box(*frames.shape[1:3], size, rng)
    box = (x, y, x + w, y + h)
    crops = [np.asarray(Image.fromarray(f).crop(box).resize((size, size), Image.BILINEAR))
             for f in frames]
    clip = torch.from_numpy(np.stack(crops)).permute(3, 0, 1, 2).float().div(255)  # (3, T, H, W)
    mean, std = (torch.tensor(v).view(3, 1, 1, 1) for v in (data.IMAGENET_MEAN, data.IMAGENET_STD))
    return clip.sub_(mean).div_(std)


def data_rows(args, paths, rows):
    T, size, n, judged = args.frames, args.size, len(paths), not args.smoke
    span = (T - 1) * RATE + 1
    torch.set_num_threads(1)  # one thread per contender, as in a DataLoader worker
    samples = [(p, 0) for p in paths]
    dataset = {k: data.VideoDataset(samples, "pretrain", T, RATE, size, num_sample=k, seed=0)
               for k in (1, 2)}
    rng = np.random.default_rng(0)

    def floor():
        for p in paths:  # opened as data.py opens files
            cap = cv2.VideoCapture(p, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
            last_start = max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) - span, 0)
            cap.set(cv2.CAP_PROP_POS_FRAMES, int(rng.integers(last_start + 1)))
            for _ in range(span):
                cap.grab()

    contenders = {"floor": floor, "ours": lambda: [dataset[1][i] for i in range(n)],
                  "ours x2": lambda: [dataset[2][i] for i in range(n)]}
    try:
        import decord, PIL  # noqa: F401  (the reference way's packages)
        skip_reference = None
    except ImportError as e:
        skip_reference = f"skipped: pip install {'pillow' if e.name == 'PIL' else e.name}"
    if not skip_reference:
        contenders["reference"] = lambda: [reference_clip(p, T, size, rng) for p in paths]
    times = race(contenders, args.reps, args.warmup)
    rate = {k: n * (2 if k == "ours x2" else 1) / v for k, v in times.items()}
    print(f"data: {n} clips of {T}x{size} at stride {RATE} per repetition, clips/s")
    row(rows, f"clips floor: seek + grab {span} frames", f"{rate['floor']:.1f}",
        clips_per_s=rate["floor"])
    row(rows, "clips reference: decord + PIL + float normalise",
        skip_reference or f"{rate['reference']:.1f}", clips_per_s=rate.get("reference"))
    row(rows, "clips ours: VideoDataset, uint8", f"{rate['ours']:.1f}", clips_per_s=rate["ours"])
    row(rows, "clips ours: num_sample=2, both clips counted", f"{rate['ours x2']:.1f}",
        clips_per_s=rate["ours x2"])
    if skip_reference:
        row(rows, "clips ours / reference", skip_reference, ">= 2.5")
    else:
        ratio_row(rows, "clips ours / reference", rate["ours"] / rate["reference"], 2.5, True,
                  judged)
    ratio_row(rows, "clips ours / floor", rate["ours"] / rate["floor"], 0.6, True, judged)
    ratio_row(rows, "clips num_sample=2 / num_sample=1", rate["ours x2"] / rate["ours"], 1.7, True,
              judged)

    loaders = {w: torch.utils.data.DataLoader(dataset[1], batch_size=1, num_workers=w,
                                              persistent_workers=True)
               for w in sorted({1, args.workers})}
    epochs = {w: (lambda ld=ld: sum(1 for _ in ld)) for w, ld in loaders.items()}
    t = race(epochs, args.reps, max(args.warmup, 1))
    for w in loaders:
        speedup = f"  (x{t[1] / t[w]:.2f} of 1 worker)" if w > 1 else ""
        row(rows, f"clips ours: DataLoader, {w} worker{'s' * (w > 1)}", f"{n / t[w]:.1f}" + speedup,
            clips_per_s=n / t[w])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="small", choices=list(models.PRESETS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    p.add_argument("--mask_ratio", type=float, default=0.9, help="tube mask")
    p.add_argument("--decoder_mask", default="none", choices=["none", "run_cell"],
                   help="run_cell: ratio 0.5")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader processes of the last data row")
    p.add_argument("--skip_data", action="store_true")
    p.add_argument("--skip_model", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="every row quickly: tiny, 4x32x32, batch 1, bf16, run_cell, 1 rep, "
                        "1 thread")
    p.add_argument("--out", help="also write the rows as JSON to this file")
    args = p.parse_args()
    if args.skip_model and args.skip_data:
        p.error("--skip_model and --skip_data leave nothing to measure")
    if args.smoke:
        vars(args).update(model="tiny", frames=4, size=32, batch=1, reps=1, warmup=0, dtype="bf16",
                          decoder_mask="run_cell")
        torch.set_num_threads(1)  # toy tensors: threads would only wait for each other
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"cpu, torch threads {torch.get_num_threads()}, "
             f"{torch.backends.cpu.get_cpu_capability()}") + f", {os.cpu_count()} CPU cores"
    print(f"torch {torch.__version__} on {where}; medians of {args.reps} repetitions after "
          f"{args.warmup} warm-up; load average {os.getloadavg()[0]:.2f}"
          + ("; smoke sizes: targets not judged" if args.smoke else ""))

    rows = []
    if not args.skip_model:
        model_rows(args, device, sync, rows)
    if not args.skip_data and args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            data_rows(args, bench_videos(Path(tmp), 2, 40, 160, 120), rows)
    elif not args.skip_data:
        data_rows(args, bench_videos(Path("data/bench"), 12, 175, 320, 240), rows)

    name_width, value_width = (max(len(r[k]) for r in rows) for k in ("name", "value"))
    for r in rows:
        met = {None: "", True: "yes", False: "NO"}[r["met"]]
        line = (f"{r['name']:<{name_width}}  {r['value']:<{value_width}}  "
                f"{r['target'] or '':<7}  {met}")
        print(line.rstrip())
    print(f"load average {os.getloadavg()[0]:.2f} at the end: "
          f"other processes on these cores slow every figure")
    if args.out:
        record = dict(args=vars(args), device=where, rows=rows)
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
