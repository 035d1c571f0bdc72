"""pytest setup shared by every test file."""
import torch

# The tests use tiny tensors: one intra-op thread is faster than two, and on a 2-core machine shared with
# other work two OpenMP threads wait at barriers for each other (measured: 50 oracle DDPM steps took 22.6 s
# with 2 threads under load, 0.45 s with 1).
torch.set_num_threads(1)


def randomized(model, seed=0):
    """Every parameter redrawn as N(0, 1/fan_in) (vectors N(0, 0.1^2)): zero-initialised heads hide nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))
    return model
