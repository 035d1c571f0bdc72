"""images.py: save_grid's row-major layout with padding. (The loss plot's size is checked by
test_train_cifar.py's run.)"""
import torch

import images
from conftest import image


def test_save_grid_places_images_row_major(tmp_path):
    imgs = torch.stack([torch.full((3, 2, 2), v, dtype=torch.uint8) for v in (10, 20, 30)])
    images.save_grid(imgs, str(tmp_path / "g.png"), nrow=2, pad=1)
    arr = image(tmp_path / "g.png")
    assert arr.shape == (1 + 2 * 3, 1 + 2 * 3, 3)
    assert arr[1, 1, 0] == 10 and arr[1, 4, 0] == 20 and arr[4, 1, 0] == 30     # row-major, pad 1
    assert arr[4, 4, 0] == 0 and arr[0, 0, 0] == 0                                # empty cell, padding
