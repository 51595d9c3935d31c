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


def test_crop_boxes_follow_the_random_resized_crop_distribution():
    from ssl_dist.augment import sample_crop_boxes

    torch.manual_seed(0)
    boxes = sample_crop_boxes(20000, 32, 32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    # Inside the image, with the area fraction and aspect ratio in their ranges.
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 32 + 1e-4).all() and (boxes[:, 3] <= 32 + 1e-4).all()
    fraction = w * h / (32 * 32)
    assert fraction.min() >= 0.2 - 1e-4 and fraction.max() <= 1 + 1e-4
    assert (w / h).min() >= 3 / 4 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4
    # Uniform in area where the candidate fits: the mean fraction is near the middle of the range.
    assert 0.5 < float(fraction.mean()) < 0.65
    whole = sample_crop_boxes(100, 4, 4, scale=(2.0, 3.0))  # nothing fits: falls back to the whole image
    assert torch.equal(whole, torch.tensor([[0.0, 0.0, 4.0, 4.0]]).expand(100, 4))


def test_batched_crop_resamples_the_box_it_drew():
    from ssl_dist.augment import BatchRandomResizedCrop

    # Left half 0, right half 1: a crop's mean is the share of its box right of the middle.
    image = torch.zeros(1, 1, 32, 32)
    image[..., 16:] = 1.0
    batch = image.expand(64, 1, 32, 32).contiguous()
    crop = BatchRandomResizedCrop(16)
    torch.manual_seed(3)
    out = crop(batch)
    torch.manual_seed(3)
    from ssl_dist.augment import sample_crop_boxes

    boxes = sample_crop_boxes(64, 32, 32, crop.scale, crop.ratio)
    right_share = ((boxes[:, 2] - boxes[:, 0].clamp(min=16)).clamp(min=0) / (boxes[:, 2] - boxes[:, 0])).clamp(max=1)
    assert out.shape == (64, 1, 16, 16)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), right_share, atol=0.04, rtol=0)
