"""Image input processing for Qwen3-Omni: load, resize, normalise, patchify.

Reproduces the reference ``Qwen2VLImageProcessorPil`` (the PIL, "slow" backend of
``Qwen2VLImageProcessor`` in transformers 5.23.0, which ``AutoImageProcessor`` maps
``qwen3_omni_moe`` to) with the Qwen3-Omni checkpoint's ``preprocessor_config.json``:
``patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=3136, max_pixels=12845056,
image_mean=image_std=[0.5, 0.5, 0.5]``, bicubic resampling. Steps:

1. load with PIL, apply the EXIF orientation, convert to RGB (``transformers.image_utils.load_image``);
2. ``smart_resize`` the height and width to multiples of ``patch_size * merge_size`` (32) with the
   pixel count inside ``[min_pixels, max_pixels]``, then resize with PIL bicubic on uint8;
3. rescale by 1/255 (computed in float64, stored float32) and normalise ``(x - mean) / std`` in float32;
4. tile each image to ``temporal_patch_size`` identical frames and cut it into
   ``grid_h * grid_w`` patches of ``3 * 2 * 16 * 16 = 1536`` values, ordered merge-block by
   merge-block (each 2x2 group of patches that the vision merger fuses into one LLM token is
   contiguous), each patch laid out as ``(channel, frame, row, col)``.

The fast (torchvision) backend of the reference resizes with torchvision's antialiased bicubic,
which differs from PIL by a grey level on some pixels; this module follows the PIL backend.
Qwen's own ``qwen-omni-utils`` additionally pre-resizes images to multiples of 28 before the
processor runs; that is not part of the reference processor and is not done here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

__all__ = [
    "VisionSettings",
    "ImageLoadError",
    "smart_resize",
    "load_image",
    "resize_rescale_normalize",
    "patchify",
    "process_images",
]

MAX_ASPECT_RATIO = 200  # smart_resize refuses more elongated images, as the reference does


class ImageLoadError(ValueError):
    """An image input could not be read or is unusable (missing, corrupt, zero-size, ...)."""


@dataclass(frozen=True)
class VisionSettings:
    """Image-processor settings. Defaults are the Qwen3-Omni checkpoint's preprocessor_config.json."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56  # 3136
    max_pixels: int = 28 * 28 * 16384  # 12845056
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def factor(self) -> int:
        """Side lengths are multiples of this: one LLM token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_preprocessor_config(cls, config) -> "VisionSettings":
        """Read the image settings from a checkpoint's ``preprocessor_config.json`` (path, folder or dict)."""
        if not isinstance(config, dict):
            import json

            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "preprocessor_config.json")
            with open(path) as f:
                config = json.load(f)
        kw = {}
        for key in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if key in config:
                kw[key] = int(config[key])
        size = config.get("size") or {}
        if "shortest_edge" in size:  # newer configs carry the pixel bounds in `size`
            kw.setdefault("min_pixels", int(size["shortest_edge"]))
        if "longest_edge" in size:
            kw.setdefault("max_pixels", int(size["longest_edge"]))
        for key in ("image_mean", "image_std"):
            if key in config:
                kw[key] = tuple(float(v) for v in config[key])
        return cls(**kw)


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 3136, max_pixels: int = 12845056):
    """Target ``(height, width)``: multiples of ``factor``, area in ``[min_pixels, max_pixels]``, aspect kept.

    Same arithmetic as the reference ``smart_resize`` (Python's round-half-to-even ``round``,
    floor when shrinking, ceil when growing).
    """
    if min(height, width) <= 0:
        raise ImageLoadError(f"Image has size {width}x{height}; both sides must be at least 1 pixel.")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageLoadError(
            f"Image of size {width}x{height} has aspect ratio {max(height, width) / min(height, width):.1f}; "
            f"at most {MAX_ASPECT_RATIO} is supported. Crop or pad it first."
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _composite_on_white(image):
    """PIL image -> RGB, transparency composited onto white (``transformers.image_transforms.convert_to_rgb``)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def load_image(image, name: str | None = None):
    """Return an RGB ``PIL.Image`` from a path, a PIL image or a uint8 array.

    * path: opened with PIL, EXIF orientation applied, ``convert("RGB")`` (as the reference's
      ``load_image``: an alpha channel is dropped, not composited);
    * PIL image: transparency composited onto white (as the reference's ``convert_to_rgb``);
    * numpy uint8 ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (RGBA composited onto white);
    * a ``data:image/...;base64,...`` URI.

    Raises ``FileNotFoundError`` for a missing file and ``ImageLoadError`` for unreadable,
    corrupt or zero-size inputs; the message names the input.
    """
    from PIL import Image, ImageOps

    if isinstance(image, str) and image.startswith("data:image/"):
        import base64
        import io

        try:
            data = base64.b64decode(image.split(",", 1)[1], validate=True)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                pil = ImageOps.exif_transpose(im).convert("RGB")
        except Exception as e:
            raise ImageLoadError(f"Could not decode the base64 image {image[:40]!r}...: {e}.") from e
        return load_image(pil, name=name or "base64 image")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path.startswith(("http://", "https://")):
            raise ImageLoadError(
                f"Image '{path}' is a URL; omni_jax does not download media. Download it and pass the local path."
            )
        if path.startswith("file://"):
            path = path[len("file://") :]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Image file '{path}' does not exist. Pass the path of an existing image file.")
        if os.path.getsize(path) == 0:
            raise ImageLoadError(f"Image file '{path}' is empty (0 bytes). Pass a valid image file.")
        try:
            with Image.open(path) as im:
                im.load()  # force the full decode now so truncated files fail here
                im = ImageOps.exif_transpose(im)
                # load_image's convert("RGB"), then the image processor's own RGB conversion (which
                # only matters for a palette image whose transparency key survives the first one).
                out = _composite_on_white(im.convert("RGB"))
        except Exception as e:
            raise ImageLoadError(
                f"Could not read image file '{path}': {e}. Expected an image PIL can decode (png, jpeg, webp, "
                "bmp, gif, tiff, ...); check that it is not truncated or corrupt."
            ) from e
        what = f"Image file '{path}'"
    elif isinstance(image, Image.Image):
        what = name or "PIL image"
        if image.width == 0 or image.height == 0:
            raise ImageLoadError(f"{what} has size {image.width}x{image.height}; both sides must be at least 1 pixel.")
        out = _composite_on_white(image)
    elif isinstance(image, np.ndarray):
        what = name or f"image array of shape {image.shape}"
        if image.dtype != np.uint8:
            raise ImageLoadError(
                f"{what} has dtype {image.dtype}; expected uint8 pixels (H, W[, C]). Convert with "
                "(x * 255).round().astype(np.uint8) for [0, 1] floats."
            )
        arr = image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ImageLoadError(f"{what}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) channels-last pixels.")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ImageLoadError(f"{what} is zero-size; both sides must be at least 1 pixel.")
        if arr.shape[-1] == 4:
            alpha = arr[..., 3:4] / 255
            arr = np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        out = Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
    else:
        raise ImageLoadError(
            f"Unsupported image input of type {type(image).__name__}; pass a file path, a PIL image or a uint8 array."
        )
    if out.width == 0 or out.height == 0:
        raise ImageLoadError(f"{what} has size {out.width}x{out.height}; both sides must be at least 1 pixel.")
    return out


def resize_rescale_normalize(
    image, height: int, width: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
) -> np.ndarray:
    """RGB PIL image -> float32 ``(3, height, width)``: PIL bicubic resize, x/255, (x - mean)/std.

    The arithmetic mirrors the reference PIL backend step by step so results agree bit for bit:
    the resize runs on uint8 (PIL rounds and clips), the rescale multiplies in float64 and casts to
    float32, the normalisation runs in float32.
    """
    from PIL import Image

    resized = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)  # (3, H, W)
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(mean, dtype=np.float32)[:, None, None]
    std = np.asarray(std, dtype=np.float32)[:, None, None]
    return (scaled - mean) / std


def patchify(frames: np.ndarray, patch_size: int = 16, merge_size: int = 2, temporal_patch_size: int = 2):
    """``(T, C, H, W)`` frames -> ``(grid_t * grid_h * grid_w, C * tps * p * p)`` patches, ``(grid_t, grid_h, grid_w)``.

    ``T`` must be a multiple of ``temporal_patch_size`` (an image is its frame repeated). Rows are
    ordered (t, h-block, w-block, h-in-block, w-in-block), so the ``merge_size**2`` patches that
    form one LLM token are consecutive; each row is laid out (channel, frame, row, col), the layout
    of the vision tower's Conv3d patch embedding. Same permutation as the reference ``patchify``.
    """
    t, c, h, w = frames.shape
    if t % temporal_patch_size:
        raise ValueError(f"patchify got {t} frames; expected a multiple of temporal_patch_size={temporal_patch_size}.")
    factor = patch_size * merge_size
    if h % factor or w % factor:
        raise ValueError(f"patchify got frames of {w}x{h}; both sides must be multiples of {factor}.")
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    # (gt, gh/m, gw/m, m, m, C, tps, p, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


def process_images(images, settings: VisionSettings | None = None) -> dict:
    """Images -> the reference processor's ``pixel_values`` and ``image_grid_thw``.

    Args:
      images: one image or a list of images (paths, PIL images or uint8 arrays).
      settings: processor settings (default: Qwen3-Omni's).

    Returns:
      dict with ``pixel_values`` float32 ``(sum_i grid_h_i * grid_w_i, 1536)`` (all images
      concatenated in order) and ``image_grid_thw`` int64 ``(n_images, 3)`` = ``[1, grid_h, grid_w]``.
      Image ``i`` becomes ``grid_h_i * grid_w_i / merge_size**2`` LLM tokens.
    """
    settings = settings or VisionSettings()
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("process_images got no images; pass at least one.")
    all_patches, grids = [], []
    for i, image in enumerate(images):
        pil = load_image(image, name=f"image #{i}")
        h, w = smart_resize(pil.height, pil.width, settings.factor, settings.min_pixels, settings.max_pixels)
        pixels = resize_rescale_normalize(pil, h, w, settings.image_mean, settings.image_std)
        frames = np.broadcast_to(pixels[None], (settings.temporal_patch_size, *pixels.shape))
        patches, grid = patchify(frames, settings.patch_size, settings.merge_size, settings.temporal_patch_size)
        all_patches.append(patches)
        grids.append(grid)
    return {
        "pixel_values": np.concatenate(all_patches, axis=0).astype(np.float32, copy=False),
        "image_grid_thw": np.asarray(grids, dtype=np.int64),
    }
