"""Batched sampling for grids, npz files and FID: seeded noise and labels, sharded across torchrun processes."""
import torch
from tqdm.auto import tqdm

from devices import Processes
from errors import RunError
from images import to_uint8


def generate(fwd, diffusion, shape, num_samples, batch_size, num_classes=0, class_label=None, sampler=None,
             steps=None, eta=0.0, cfg_scale=1.0, cfg_channels=None, null_label=None, seed=0, device="cpu",
             progress=True, decode=None, procs=None):
    """Yield (uint8 (n, C, H, W) images, labels or None) batches; noise and labels from a CPU generator (the same on
    any device). decode: samples -> [-1, 1] (a VAE). Under torchrun rank k % world samples batch k, main yields all."""
    sampler = diffusion.default_sampler if sampler is None else sampler
    if eta and sampler != "ddim":
        raise RunError(f"eta is the DDIM sampler's option; the {sampler} sampler takes none (drop --eta)")
    options = {"eta": eta} if sampler == "ddim" else {}  # sampler-specific options, only where the sampler has them
    procs = procs or Processes()
    gen = torch.Generator().manual_seed(seed)
    labels = draw_labels(num_samples, num_classes, class_label, gen) if num_classes else None
    starts = range(0, num_samples, batch_size)
    mine, bar = None, tqdm(total=len(starts[procs.rank::procs.world]) * diffusion.nfe(sampler, steps), unit="step",
                           desc="sampling", disable=not progress or not procs.main)
    for k, i in enumerate(starts):
        n = min(batch_size, num_samples - i)
        noise = torch.randn((n, *shape), generator=gen)  # drawn by every process: the generator stays in step
        y = None if labels is None else labels[i:i + n]
        if k % procs.world == procs.rank:
            x = diffusion.sample(ticking(fwd, bar), (n, *shape), sampler=sampler, steps=steps,
                                 model_kwargs=None if y is None else {"y": y.to(device)}, cfg_scale=cfg_scale,
                                 cfg_channels=cfg_channels, null_label=null_label, noise=noise, device=device,
                                 clip_denoised=decode is None, generator=torch.Generator(device).manual_seed(seed + i),
                                 **options)
            mine = (to_uint8(x if decode is None else decode(x)).cpu(), y)
        if k % procs.world == procs.world - 1 or k == len(starts) - 1:  # a round done: batches in rank order
            yield from (batch for batch in procs.gather(mine) or [] if batch is not None)
            mine = None
    bar.close()


def ticking(fwd, bar):
    """fwd that advances a progress bar by one per network call: sampling progress in sampler steps x batches."""
    return lambda *a, **kw: (fwd(*a, **kw), bar.update())[0]


def draw_labels(num_samples, num_classes, class_label, gen):
    """class_label for every sample (or a (num_samples,) tensor of them), else uniform labels from gen (drawn
    before any noise)."""
    if torch.is_tensor(class_label):
        return class_label
    if class_label is not None:
        return torch.full((num_samples,), class_label)
    return torch.randint(num_classes, (num_samples,), generator=gen)
