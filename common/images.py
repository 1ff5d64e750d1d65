"""Image geometry shared by training's loaders and the gateway's uploads, so that both see the same view
of an image whose aspect ratio differs from the model's input: the largest centred box of the input's
H:W, then a resize."""

from __future__ import annotations


def centre_box(image_width: int, image_height: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest box centred in an image of `image_width` x `image_height`
    whose sides are in the ratio `width`:`height` (rounded to whole pixels; at least one pixel a side)."""
    if image_width * height >= image_height * width:  # the image is wider than the model's input: full height
        box_width, box_height = (image_height * width + height // 2) // height, image_height
    else:  # taller: full width
        box_width, box_height = image_width, (image_width * height + width // 2) // width
    box_width, box_height = max(1, min(box_width, image_width)), max(1, min(box_height, image_height))
    left, top = (image_width - box_width) // 2, (image_height - box_height) // 2
    return left, top, left + box_width, top + box_height
