"""pytest setup shared by every test file."""
import torch

# The tests use tiny tensors: one intra-op thread is faster than two, and on a 2-core machine shared with
# other work two OpenMP threads wait at barriers for each other (measured: 50 oracle DDPM steps took 22.6 s
# with 2 threads under load, 0.45 s with 1).
torch.set_num_threads(1)
