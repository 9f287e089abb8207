"""What this project draws with OpenCV (the run-time packages have no plotting library): a run's
pictures, returned as BGR uint8 arrays for the caller to write, and the demo's synthetic videos.
Nothing of the project is imported here.

line_chart         one figure of log.jsonl against the epoch (curves.png holds one per figure)
confusion          a confusion matrix: named classes, each cell's share, the most-confused pairs
film_strip         rows of frames one above the other, with a caption (the reconstruction pictures)
make_demo_dataset  the demo set: videos that demo_frames draws, and their list files
"""
import argparse
import json
import math
import os
import re
import shutil
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

CURVE_COLOUR = (170, 80, 20)  # BGR: blue
SERIES_COLOURS = [CURVE_COLOUR, (30, 120, 230), (60, 150, 40)]  # then orange, green
GRID_GREY = (225, 225, 225)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def text_width(text, scale):
    return cv2.getTextSize(text, FONT, scale, 1)[0][0]


def put(img, text, x, y, scale=0.4, color=(0, 0, 0), align=0.0):
    """Text on its baseline y, starting at x (align 0), centred on x (0.5) or ending at x (1)."""
    x = x - align * text_width(text, scale)
    cv2.putText(img, text, (int(x), int(y)), FONT, scale, color, 1, cv2.LINE_AA)


def nice_ticks(lo, hi, most=6):
    """Round values (steps of 1, 2 or 5 times a power of ten) from at/below lo to at/above hi."""
    span = max(hi - lo, abs(hi) * 0.1, 1e-12)
    unit = 10 ** math.floor(math.log10(span / most))
    step = next(m * unit for m in (1, 2, 5, 10) if span / (m * unit) <= most)
    first = math.floor(lo / step)
    last = max(math.ceil(hi / step), first + 1)
    return np.arange(first, last + 1) * step


def line_chart(points, title, percent=False, **size):
    """One figure of a run against the epoch: (epoch, value) points, the last value in the title."""
    fmt = "{:.0%}" if percent else "{:.3g}"
    last = fmt.format(points[-1][1])
    return chart({title: points}, f"{title}: {last}", percent=percent, legend=False, **size)


def chart(series, title, xlabel="epoch", percent=False, legend=True, W=360, H=250, left=62, right=18,
          top=34, bottom=40):
    """A line chart of one or more series {name: [(x, y), ...]}: a line through each series' mean y at
    each x, a dot for every point (seeds, say) when there are few, and the names as a legend.
    x runs over whole numbers; percentages from 0 to 100%."""
    img = np.full((H, W, 3), 255, np.uint8)
    everything = np.array([point for points in series.values() for point in points], dtype=float)
    if percent:
        ticks = nice_ticks(0, 1)
    else:
        ticks = nice_ticks(everything[:, 1].min(), everything[:, 1].max())
    # Whole numbers along x; a single x still spans an axis.
    xs = np.unique(nice_ticks(everything[:, 0].min(), everything[:, 0].max() + 1).round())
    rows = np.interp(ticks, (ticks[0], ticks[-1]), (H - bottom, top)).astype(int)
    cols = np.interp(xs, (xs[0], xs[-1]), (left, W - right)).astype(int)
    fmt = "{:.0%}" if percent else "{:.3g}"
    for tick, row in zip(ticks, rows):
        cv2.line(img, (left, row), (W - right, row), GRID_GREY, 1)
        put(img, fmt.format(tick), left - 5, row + 4, align=1)
    for x, col in zip(xs, cols):
        cv2.line(img, (col, H - bottom), (col, H - bottom + 4), (0, 0, 0), 1)
        put(img, f"{x:.0f}", col, H - bottom + 17, align=0.5)
    cv2.rectangle(img, (left, top), (W - right, H - bottom), (0, 0, 0), 1)

    def pixels(points):  # (n, 2) data -> (n, 2) pixel positions
        px = np.interp(points[:, 0], xs[[0, -1]], (left, W - right))
        py = np.interp(points[:, 1], ticks[[0, -1]], (H - bottom, top))
        return np.stack([px, py], axis=1).round().astype(np.int32)
    for k, (name, points) in enumerate(series.items()):
        colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
        points = np.array(points, dtype=float)
        at = np.unique(points[:, 0])
        means = np.array([[x, points[points[:, 0] == x, 1].mean()] for x in at])
        cv2.polylines(img, [pixels(means)], False, colour, 2, cv2.LINE_AA)
        if len(points) <= 20:  # few points are marked: a single one shows as a dot
            for px, py in pixels(points):
                cv2.circle(img, (int(px), int(py)), 3, colour, -1, cv2.LINE_AA)
        if legend:
            put(img, name, left + 6, top + 16 + 15 * k, color=colour)  # the legend, top left
    put(img, xlabel, (left + W - right) / 2, H - 6, align=0.5)
    put(img, title, left, top - 12, scale=0.45)
    return img


CURVES = {"loss": "training loss", "lr": "learning rate", "val_top1": "validation top-1",
          "knn_top1": "k-NN probe top-1, frozen encoder"}  # what curves.png draws, if logged


def curves(records):
    """curves.png of a run: one panel for each figure of CURVES that its log records hold."""
    panels = []
    for key, title in CURVES.items():
        points = [(r["epoch"], r[key]) for r in records if key in r]
        if points:
            panels.append(line_chart(points, title, percent=key.endswith("top1")))
    return np.hstack(panels)


def _cell_colour(share):
    """White for 0, deep blue for 1 (BGR)."""
    return (255, 255 - 150 * share, 255 - 215 * share)


def _name_strip(names, cell, width, font, align):
    """The class names one per cell-high row, cut to the width, ending at its right edge (align 1)
    or starting at its left edge (align 0)."""
    strip = np.full((len(names) * cell, width, 3), 255, np.uint8)
    for i, name in enumerate(names):
        while len(name) > 1 and text_width(name, font) > width - 6:
            name = name[:-1]
        x = width - 4 if align else 4
        put(strip, name, x, (i + 0.5) * cell + 11 * font, font, align=align)
    return strip


def confusion_text(share, counts, names, pairs):
    """What confusion() prints: {(true, predicted): the cell's percentage} for the cells with
    videos, the title, and a line for each of `pairs`."""
    cells = {(int(t), int(p)): f"{100 * share[t, p]:.0f}" for t, p in zip(*np.nonzero(counts))}
    total = counts.sum()
    title = f"confusion on {total} test videos, top-1 {np.trace(counts) / max(total, 1):.1%}"
    lines = [f"{100 * share[t, p]:3.0f}%  {names[t]} -> {names[p]} ({counts[t, p]} of "
             f"{counts[t].sum()})" for t, p in pairs]
    return cells, title, lines


def confusion(share, counts, names, pairs):
    """A confusion matrix that reads alone: true class down, predicted across, both named; each cell
    the share of the true class's videos in percent (blank: none); beside it the most-confused
    `pairs` [(true, predicted)], by name. share and counts are (K, K) arrays. Cells shrink with the
    class count, to 18 pixels for UCF101's 101 classes."""
    K = len(names)
    cell = int(np.clip(1100 // K, 18, 64))
    font = min(0.5, cell / 60)
    cells, title, lines = confusion_text(share, counts, names, pairs)
    grid = np.full((K * cell, K * cell, 3), 255, np.uint8)
    for (t, p), text in cells.items():
        grid[t * cell:(t + 1) * cell, p * cell:(p + 1) * cell] = _cell_colour(share[t, p])
        ink = (255, 255, 255) if share[t, p] > 0.5 else (0, 0, 0)
        put(grid, text, (p + 0.5) * cell, (t + 0.5) * cell + 11 * font, font, ink, align=0.5)
    grid[::cell] = 200  # lines between cells
    grid[:, ::cell] = 200
    grid[-1] = 200
    grid[:, -1] = 200
    label_w = min(160, max(text_width(name, font) for name in names) + 8)  # longer names are cut
    band, title_h = 24, 56  # the axis titles' band, the title above
    top, left = title_h + band + label_w, band + label_w  # the grid's corner
    side = K * cell
    height = max(side, 20 * len(pairs) + 24)
    img = np.full((top + height + 10, max(left + side + 420, 760), 3), 255, np.uint8)
    img[top:top + side, left:left + side] = grid
    img[top:top + side, band:left] = _name_strip(names, cell, label_w, font, align=1)
    column_names = cv2.rotate(_name_strip(names, cell, label_w, font, align=0),
                              cv2.ROTATE_90_COUNTERCLOCKWISE)
    img[title_h + band:top, left:left + side] = column_names
    put(img, "predicted class", left + side / 2, title_h + band - 8, 0.5, align=0.5)
    true_title = np.full((band, side, 3), 255, np.uint8)  # turned to read bottom to top
    put(true_title, "true class", side / 2, band - 8, 0.5, align=0.5)
    img[top:top + side, :band] = cv2.rotate(true_title, cv2.ROTATE_90_COUNTERCLOCKWISE)
    put(img, title, 8, 20, 0.5)
    put(img, "row: true class; cell: % of its videos predicted as the column's class (blank: 0%)",
        8, 42, 0.45)
    x, y = left + side + 16, top + 14
    put(img, "most confused: true -> predicted, % of true", x, y, 0.45)
    for line in lines:
        y += 20
        put(img, line, x, y, 0.45)
    return img


def film_strip(rows, caption, width=512):
    """rows: RGB float arrays (T, H, W, 3) in [0, 1] of equal shape, drawn one above the other, the
    frames of a row side by side, enlarged to about `width` pixels with sharp pixels, the caption
    below. Returns BGR."""
    img = np.concatenate([np.concatenate(list(frames), axis=1) for frames in rows], axis=0)
    img = (img[..., ::-1] * 255).round().astype(np.uint8)  # (rows*H, T*W, 3), BGR
    zoom = max(1, width // img.shape[1])  # small clips drawn larger
    img = cv2.resize(img, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    lines = textwrap.wrap(caption, img.shape[1] // 6)
    band = np.full((14 * len(lines) + 4, img.shape[1], 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(band, line, (2, 13 + 14 * i), FONT, 0.33, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([img, band])


# ------------------------------------------------------------------------------------- the demo set

DEMO_CLASSES = ("right", "left", "grow", "shrink", "brighten", "darken")


def demo_frames(cls, rng, num_frames, W=96, H=72):
    """The frames (RGB uint8 (H, W, 3)) of one demo video: a bright polygon on a darker plain ground
    that moves right or left, grows or shrinks, brightens or darkens, by class. Colours, shape,
    size, place and speed are drawn from rng, so no single frame tells the class; every class
    changes a 2-frame tubelet with the same sign in every video (the object is always brighter than
    the ground), which a small ViT learns in minutes on a CPU. The object is large and plain, so
    that rebuilding it dominates the reconstruction loss."""
    ground, colour = rng.uniform(20, 90, 3), rng.uniform(150, 250, 3)
    k = rng.integers(4, 9)  # corners of `shape`, a unit-size polygon
    angles = 2 * np.pi * (np.arange(k) + rng.uniform(-0.3, 0.3, k)) / k + rng.uniform(0, 2 * np.pi)
    shape = rng.uniform(0.7, 1.0, (k, 1)) * np.stack([np.cos(angles), np.sin(angles)], 1)
    radius, speed, rate = rng.uniform(22, 32), rng.uniform(0.6, 1.0), rng.uniform(0.012, 0.02)
    centre = rng.uniform((0.3 * W, 0.3 * H), (0.7 * W, 0.7 * H))
    for t in range(num_frames):
        dt = t - (num_frames - 1) / 2  # frames from the middle
        ramp = t / max(num_frames - 1, 1)  # 0 -> 1
        shift = {"right": (speed * dt, 0), "left": (-speed * dt, 0)}.get(cls, (0, 0))
        scale = {"grow": math.exp(rate * dt), "shrink": math.exp(-rate * dt)}.get(cls, 1.0)
        # level: the share of the way from the ground to `colour`
        level = {"brighten": 0.55 + 0.45 * ramp, "darken": 1.0 - 0.45 * ramp}.get(cls, 1.0)
        points = np.round(centre + shift + radius * scale * shape).astype(np.int32)
        inside = cv2.fillPoly(np.zeros((H, W), np.float32), [points], 1)[..., None]
        yield np.clip(ground + inside * (colour - ground) * level, 0, 255).astype(np.uint8)


def _demo_video(path, cls, rng, num_frames, W=96, H=72):
    """One video of class `cls` (demo_frames) as XVID; MJPG where OpenCV lacks XVID."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"XVID"), 25, (W, H))
    if not writer.isOpened():
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (W, H))
    for frame in demo_frames(cls, rng, num_frames, W, H):
        writer.write(frame[..., ::-1].copy())  # RGB drawn, BGR written
    writer.release()


def make_demo_dataset(root="data/demo", num_classes=6, videos_per_class=70, val_per_class=20,
                      num_frames=48, seed=0):
    """Synthetic motion classes in root/<class>/*.avi, train.txt and val.txt, deterministic from
    seed; a set of these parameters is reused, other folders left alone. Built in a temporary folder
    renamed when complete: a killed build leaves nothing; of racing calls the first done is used."""
    root = Path(root)
    meta = dict(num_classes=num_classes, videos_per_class=videos_per_class,
                val_per_class=val_per_class, num_frames=num_frames, seed=seed, version=3)

    def complete():  # meta.json is written last, so a root that has it holds a whole set
        meta_file = root / "meta.json"
        return meta_file.is_file() and json.loads(meta_file.read_text()) == meta
    if complete():
        return root
    if root.exists():  # never deleted: racing calls can"t tell a stale set from one just renamed
        raise FileExistsError(f"{root} exists and is not this demo set (see its meta.json); "
                              f"delete it or pass another --data_path")
    tmp = root.with_name(f".{root.name}.{uuid.uuid4().hex}")  # unique across processes and hosts
    lists, jobs = {"train.txt": [], "val.txt": []}, []
    try:
        for label, cls in enumerate(DEMO_CLASSES[:num_classes]):
            (tmp / cls).mkdir(parents=True)
            for k in range(videos_per_class):
                rel = f"{cls}/{cls}_{k:03d}.avi"
                split = "val.txt" if k >= videos_per_class - val_per_class else "train.txt"
                lists[split].append(f"{rel} {label}\n")
                jobs.append((tmp / rel, cls, np.random.default_rng([seed, label, k]), num_frames))
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # OpenCV and numpy release the GIL
            list(pool.map(lambda job: _demo_video(*job), jobs))
        for name, lines in lists.items():
            (tmp / name).write_text("".join(lines))
        (tmp / "meta.json").write_text(json.dumps(meta))
        if not complete():
            os.replace(tmp, root)
    except OSError:  # the rename fails on the set of a call that finished in between: it is used
        if not complete():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------- the data-efficiency study (README)

def efficiency(study_dir, pretrain_dir):
    """The data-efficiency study from its runs' logs (the README's command): the held-out top-1 of
    each start (from scratch, VideoMAE) and number of labelled videos a class, seeds as points; and,
    against the pre-training epoch, the k-NN probe that pre-training logged beside the top-1 of 10
    labelled videos a class fine-tuned from each numbered checkpoint. Prints both tables, writes
    efficiency.png into study_dir."""
    by_labels, by_epoch = {}, {}
    for log in sorted(Path(study_dir).glob("*/log.jsonl")):
        records = [json.loads(line) for line in log.read_text().splitlines()]
        tests = [r["test"]["top1"] for r in records if "test" in r]
        if not tests:
            continue  # a run that did not finish
        config = records[0]["config"]
        numbered = re.search(r"checkpoint-(\d+)\.pth$", config["finetune"])
        if numbered:  # the curve: from the checkpoint after this epoch
            by_epoch.setdefault(int(numbered[1]) + 1, []).append(tests[-1])
        else:
            start = "from scratch" if config["finetune"] == "none" else "VideoMAE"
            by_labels.setdefault(start, {}).setdefault(config["per_class"], []).append(tests[-1])
    by_labels = {start: by_labels[start] for start in ("from scratch", "VideoMAE") if start in by_labels}
    print("| labelled videos a class | " + " | ".join(f"{s}, seeds | mean" for s in by_labels) + " |")
    print("|---" * (1 + 2 * len(by_labels)) + "|")
    for n in sorted({n for runs in by_labels.values() for n in runs}, reverse=True):
        cells = []
        for runs in by_labels.values():
            top1 = runs.get(n, [])
            cells.append(" / ".join(f"{t:.1%}" for t in top1) + f" | {np.mean(top1):.1%}")
        print(f"| {n} | " + " | ".join(cells) + " |")
    knn = {}
    pretrain_log = Path(pretrain_dir) / "log.jsonl"
    for r in map(json.loads, pretrain_log.read_text().splitlines()):
        if "knn_top1" in r:
            knn[r["epoch"] + 1] = r["knn_top1"]
    print("\n| pre-training epochs | k-NN top-1 | 10 labelled videos a class, top-1 |\n|---|---|---|")
    for epoch in sorted(set(knn) | set(by_epoch)):
        tuned = " / ".join(f"{t:.1%}" for t in by_epoch.get(epoch, [])) or "-"
        probe = f"{knn[epoch]:.1%}" if epoch in knn else "-"
        print(f"| {epoch} | {probe} | {tuned} |")
    labels = {}
    for start, runs in by_labels.items():
        labels[start] = [(n, t) for n, top1 in runs.items() for t in top1]
    epochs = {"k-NN probe, frozen encoder": list(knn.items())}
    if by_epoch:
        epochs["fine-tuned, 10 a class"] = [(e, t) for e, top1 in by_epoch.items() for t in top1]
    panels = [chart(labels, "held-out top-1", "labelled videos a class", percent=True),
              chart(epochs, "against pre-training epochs", "pre-training epoch", percent=True)]
    path = Path(study_dir) / "efficiency.png"
    tmp = path.with_name(f".{path.name}.tmp.png")  # written whole, then renamed
    cv2.imwrite(str(tmp), np.hstack(panels))
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Summarise the data-efficiency study (README).")
    parser.add_argument("--efficiency", nargs=2, metavar=("STUDY_DIR", "PRETRAIN_DIR"), required=True,
                        help="the folder of the study's fine-tuning runs, and the pre-training run's")
    efficiency(*parser.parse_args().efficiency)
