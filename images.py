"""Images: model space [-1, 1] -> uint8, PNG grids, the loss curve (Pillow only)."""
import math
import os

import torch
from PIL import Image, ImageDraw

from errors import RunError, first_line
from files import atomic_write


def to_uint8(x):
    """Model-space [-1, 1] -> uint8 [0, 255] (rounded)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_grid(images, path, nrow=8, pad=2, captions=None):
    """(N, C, H, W) uint8 (C = 1 or 3) -> one PNG (written atomically), nrow per row, pad black pixels between;
    captions: a text per row, written above it (text-to-image grids: the prompts)."""
    images = torch.as_tensor(images).cpu()
    if images.ndim != 4 or images.dtype != torch.uint8 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid wants uint8 (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    cols = max(1, min(nrow, n))
    grid = torch.zeros(c, pad + math.ceil(n / cols) * (h + pad), pad + cols * (w + pad), dtype=torch.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    arr = grid.permute(1, 2, 0).numpy()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create the folder of {path} ({first_line(e)}); choose a writable path") from None
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    if captions:
        if len(captions) != math.ceil(n / cols):
            raise ValueError(f"save_grid: {len(captions)} captions for {math.ceil(n / cols)} rows")
        img = captioned(img.convert("RGB"), captions, h + pad, pad)
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def captioned(img, captions, row_height, pad, strip=12):
    """img with a white strip of text above each row of images (the default bitmap font, cut to the width)."""
    out = Image.new("RGB", (img.width, img.height + strip * len(captions)), "white")
    draw, fit = ImageDraw.Draw(out), max(1, img.width // 6)  # the default font: about 6 px per character
    for r, text in enumerate(captions):
        top = r * (row_height + strip)
        draw.text((pad, top), text if len(text) <= fit else text[:fit - 3] + "...", fill="black")
        out.paste(img.crop((0, r * row_height, img.width, (r + 1) * row_height)), (0, top + strip))
    rest = img.crop((0, len(captions) * row_height, img.width, img.height))  # the bottom padding
    out.paste(rest, (0, len(captions) * (row_height + strip)))
    return out


def plot_losses(records, path, size=(800, 480)):
    """Loss vs step with Pillow: log10 y axis, 5 ticks per axis labelled with the default font."""
    pts = [(r["step"], math.log10(r["loss"])) for r in records if r.get("loss", 0) > 0 and math.isfinite(r["loss"])]
    if len(pts) < 2:
        return
    (W, H), (L, R, T, B), (xs, ys) = size, (70, 20, 30, 40), zip(*pts)  # margins: left, right, top, bottom
    x0, x1, y0, y1 = min(xs), max(max(xs), min(xs) + 1), min(ys), max(max(ys), min(ys) + 1e-3)  # never 0-wide
    px = lambda s: L + (s - x0) / (x1 - x0) * (W - L - R)
    py = lambda v: T + (y1 - v) / (y1 - y0) * (H - T - B)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(5):
        s, v = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
        d.text((px(s) - 15, H - B + 8), f"{int(s)}", fill="black")
        d.line([L - 4, py(v), W - R, py(v)], fill=(225, 225, 225))
        d.text((5, py(v) - 6), f"{10 ** v:.4g}", fill="black")
    d.line([(px(s), py(v)) for s, v in pts], fill=(31, 119, 180), width=2)
    d.text((L, 8), "training loss (log scale) vs step", fill="black")
    atomic_write(path, lambda f: img.save(f, format="PNG"))
