"""Two-view augmentation: one random draw per image, in both placements."""

import torch
from PIL import Image

from ssl_dist.augment import BatchTwoViews, Decode, TwoViews


def test_batch_views_draw_per_image_and_follow_the_seed():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    batch = image.expand(8, 3, 32, 32).contiguous()  # eight copies of one image
    augment = BatchTwoViews(32)
    torch.manual_seed(0)
    v1, v2 = augment(batch)
    assert v1.shape == v2.shape == (8, 3, 32, 32) and v1.dtype == torch.float32
    # Every copy got its own draw: no two views of the batch are equal.
    flat = torch.cat([v1, v2]).flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(16) * 1e9).min() > 1e-3
    torch.manual_seed(0)
    w1, w2 = augment(batch)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)


def test_sample_views_and_decode_shapes():
    sample = {"__key__": "k", "image": Image.new("RGB", (48, 40), (200, 10, 10)), "cls": 3}
    torch.manual_seed(1)
    views = TwoViews(32)(sample)
    assert views["view1"].shape == views["view2"].shape == (3, 32, 32) and views["cls"] == 3
    decoded = Decode(32)(sample)
    assert decoded["image"].shape == (3, 32, 32) and decoded["image"].dtype == torch.uint8
    assert decoded["image"][0].float().mean() > 150  # red stays red: decoded, not normalised
