"""Host-side resizing of decoded images to the fixed square size a split stores."""

from __future__ import annotations

import numpy as np
from PIL import Image


def square_image(image: Image.Image | np.ndarray, size: int, centre_crop: bool) -> np.ndarray:
  """An RGB image as uint8 ``(size, size, 3)``, bilinear.

  ``centre_crop=False`` resizes to the square (the official ImageNet-30 training
  ``Resize((256, 256))``); ``True`` resizes the shorter side to ``size`` (torchvision's
  ``Resize(int)``: the longer side becomes ``int(size * long / short)``) and takes the
  centred square, so a later centre crop equals ``Resize(size), CenterCrop(crop)``.

  Example:
    >>> square_image(np.zeros((30, 60, 3), np.uint8), 16, centre_crop=True).shape
    (16, 16, 3)
  """
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  image = image.convert("RGB")
  if not centre_crop:
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
  width, height = image.size
  if width <= height:
    new_w, new_h = size, int(size * height / width)
  else:
    new_w, new_h = int(size * width / height), size
  image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
  left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
  return np.asarray(image.crop((left, top, left + size, top + size)))
