"""Which tokens the encoder sees, and which ones the decoder rebuilds.

Every mask here is a bool tensor of shape (B, t*h*w) in the order of the cube embedding's tokens
(t-major, then h, then w); True means hidden (from the encoder) or, for the decoder mask, not
rebuilt. All functions are vectorised over the batch and reproducible with an optional
torch.Generator. Run `python mask.py` to see one of each.
"""
import torch


def _hide_lowest(noise, num_hidden):
    """Hide the `num_hidden` entries of smallest noise in each row: an exact count, uniformly at
    random."""
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each entry within its row
    return rank < num_hidden


def tube_mask(batch_size, grid, ratio, generator=None, device=None):
    """Sec. 3.3 of the paper: tube masking. The same int(ratio*h*w) spatial positions are hidden in
    every temporal slice, so a hidden patch cannot be copied from its neighbour in time (ratio 0.9:
    160 of 1568 tokens stay visible for a 16x224x224 clip)."""
    t, h, w = grid
    noise = torch.rand(batch_size, h * w, generator=generator, device=device)
    hidden = _hide_lowest(noise, int(ratio * h * w))  # (B, h*w)
    return hidden.unsqueeze(1).expand(batch_size, t, h * w).reshape(batch_size, t * h * w)


def random_mask(batch_size, grid, ratio, generator=None, device=None):
    """Per-token random masking (the paper's ablation, Table 1c): int(ratio*t*h*w) tokens hidden per
    clip."""
    t, h, w = grid
    noise = torch.rand(batch_size, t * h * w, generator=generator, device=device)
    return _hide_lowest(noise, int(ratio * t * h * w))


def running_cell_mask(batch_size, grid, ratio=0.5, generator=None, device=None):
    """VideoMAE V2's decoder mask ("running cell"): True = the decoder does not rebuild this token.

    A 2x2 cell holds int(4*ratio) ones then zeros, read in row-major order; at temporal index i the
    cell is rolled by i+1 steps from a start chosen per clip, and tiled over the h x w grid. Each
    token is thus rebuilt in (1-ratio) of the slices, and every slice rebuilds a different, evenly
    spread subset.
"""
    t, h, w = grid
    if h % 2 or w % 2:
        raise ValueError(f"running cell mask needs an even token grid, got {h}x{w}")
    hidden_per_cell = int(4 * ratio)
    if not 0 < hidden_per_cell < 4:
        raise ValueError(f"decoder mask ratio {ratio} leaves int(4*ratio)={hidden_per_cell}; "
                         f"use 0.25-0.75")
    start = torch.randint(0, 4, (batch_size, 1, 1, 1), generator=generator, device=device)
    ti = torch.arange(t, device=device).view(1, t, 1, 1)
    row = torch.arange(h, device=device).view(1, 1, h, 1) % 2
    column = torch.arange(w, device=device) % 2
    cell = 2 * row + column  # each token's place in its 2x2 cell, row-major
    slot = (cell + start + ti + 1) % 4  # position in the rolled cell, (B, t, h, w)
    return (slot < hidden_per_cell).reshape(batch_size, t * h * w)


def trivial_predictions(target, mask, grid):
    """What the visible tokens give away without any learning, the yardsticks of the reconstruction
    loss: for the hidden tokens of each clip, 'mean_visible' fills every one with the mean of the
    clip's visible pixels (per channel); 'nearest_visible' copies the nearest visible token of the
    same time slice (grid distance, ties to the first in token order; the nearest slice if a slice
    shows none). Random masking leaves a visible neighbour in the next slice of almost every hidden
    token; tube masking does not (Sec. 3.3). target (B, N, P*C) of every token in the loss's target
    space, mask (B, N) True = hidden. Returns both as (B, N_hidden, P*C)."""
    B, N, D = target.shape
    pixels = target.view(B, N, -1, 3)  # (B, N, P, C), channel fastest
    visible = ~mask
    visible_pixels = visible.sum(1)[:, None] * pixels.shape[2]  # (B, 1)
    mean = (pixels * visible[..., None, None]).sum(dim=(1, 2)) / visible_pixels  # (B, C)
    mean_visible = mean[:, None, None, :].expand_as(pixels).reshape(B, N, D)
    t, h, w = torch.meshgrid(*(torch.arange(s, device=target.device) for s in grid), indexing="ij")
    slices_apart = grid[1] + grid[2]  # farther than any two tokens of one slice
    coords = torch.stack([t.flatten() * slices_apart, h.flatten(), w.flatten()], 1).float()
    dist = torch.cdist(coords, coords)[None].expand(B, N, N)  # coords (N, 3)
    dist = dist.masked_fill(mask[:, None, :], float("inf"))
    source = dist.argmin(dim=2)  # (B, N): the nearest visible token of each token
    nearest_visible = torch.gather(target, 1, source[..., None].expand(B, N, D))
    return mean_visible[mask].view(B, -1, D), nearest_visible[mask].view(B, -1, D)


MASKS = {"tube": tube_mask, "random": random_mask}


def hidden_per_clip(kind, grid, ratio):
    """How many tokens a mask of `kind` ('tube', 'random' or 'run_cell') hides in each clip: the
    same in every clip, known from kind, grid and ratio alone, without drawing a mask. The model
    takes it to gather the tokens with shapes fixed in advance (model.split_tokens)."""
    t, h, w = grid
    if kind == "tube":
        return t * int(ratio * h * w)
    if kind == "random":
        return int(ratio * t * h * w)
    if kind == "run_cell":
        return t * h * w // 4 * int(4 * ratio)  # int(4*ratio) of each 2x2 cell, in every slice
    raise ValueError(f"unknown mask kind {kind!r}; choose tube, random or run_cell")


def show(mask, grid):
    """One clip's mask as text: a row of t slices, '#' hidden, '.' shown."""
    t, h, w = grid
    m = mask.view(t, h, w)
    rows = []
    for y in range(h):  # one text row: row y of every slice, side by side
        rows.append("  ".join("".join("#" if v else "." for v in m[i, y]) for i in range(t)))
    return "\n".join(rows)


if __name__ == "__main__":
    grid, g = (4, 8, 8), torch.Generator().manual_seed(0)
    examples = {"tube_mask(ratio=0.75)": tube_mask(1, grid, 0.75, g),
                "random_mask(ratio=0.75)": random_mask(1, grid, 0.75, g),
                "running_cell_mask(ratio=0.5)  (decoder: '#' not rebuilt)": running_cell_mask(1, grid, 0.5, g)}
    t, h, w = grid
    for name, mask in examples.items():
        print(f"{name}: {t} temporal slices of {h}x{w} tokens, {int(mask.sum())} of {t * h * w} hidden")
        print(show(mask[0], grid), end="\n\n")
