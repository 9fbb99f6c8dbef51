"""omni_jax.processing.image against the reference Qwen2VL image processor (PIL backend, Qwen3-Omni settings)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from omni_jax.processing import image as I


def assert_same(ours: dict, ref) -> None:
    assert ours["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    # Bit-exact in practice; 1e-6 leaves room for a different numpy/PIL build.
    np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(37, 53), (451, 300), (20, 20), (700, 1000)])
def test_pixel_values_match_reference(ref_image_processor, media, size):
    img = Image.fromarray(media.drawn_image(*size))
    ref = ref_image_processor([img], return_tensors="np")
    ours = I.process_images([img])
    assert_same(ours, ref)
    t, h, w = ours["image_grid_thw"][0]
    assert t == 1 and ours["pixel_values"].shape == (h * w, 3 * 2 * 16 * 16)


def test_two_images_of_different_sizes_concatenate_like_reference(ref_image_processor, media, tmp_path):
    a = Image.fromarray(media.drawn_image(120, 90, seed=1))
    b_path = tmp_path / "b.png"
    Image.fromarray(media.drawn_image(333, 517, seed=2)).save(b_path)
    from transformers.image_utils import load_image as ref_load_image

    ref = ref_image_processor([a, ref_load_image(str(b_path))], return_tensors="np")
    ours = I.process_images([a, str(b_path)])
    assert_same(ours, ref)
    assert ours["image_grid_thw"].tolist() == [[1, 8, 6], [1, 20, 32]]


def test_image_modes_match_reference(ref_image_processor, media, tmp_path):
    from transformers.image_utils import load_image as ref_load_image

    rgb = media.drawn_image(64, 96, seed=3)
    rgba = np.concatenate([rgb, (np.arange(64 * 96) % 256).reshape(64, 96, 1).astype(np.uint8)], axis=-1)
    inputs = [
        Image.fromarray(rgba, mode="RGBA"),  # PIL input: alpha composited on white
        Image.fromarray(rgb).convert("L"),
        Image.fromarray(rgb).convert("P"),
        rgb,  # uint8 array
    ]
    for inp in inputs:
        ref = ref_image_processor([inp], return_tensors="np")
        assert_same(I.process_images([inp]), ref)
    # Files: JPEG (lossy decode must match) and RGBA PNG (load_image drops alpha).
    for name, img in (("c.jpg", Image.fromarray(rgb)), ("d.png", Image.fromarray(rgba, mode="RGBA"))):
        img.save(tmp_path / name)
        ref = ref_image_processor([ref_load_image(str(tmp_path / name))], return_tensors="np")
        assert_same(I.process_images([str(tmp_path / name)]), ref)


def test_base64_data_uri_matches_reference(ref_image_processor, media):
    import base64
    import io

    from transformers.image_utils import load_image as ref_load_image

    buf = io.BytesIO()
    Image.fromarray(media.drawn_image(70, 45, seed=5)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert_same(I.process_images([uri]), ref_image_processor([ref_load_image(uri)], return_tensors="np"))


def test_exif_orientation_applied(tmp_path, media):
    img = Image.fromarray(media.drawn_image(40, 80))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    loaded = I.load_image(str(tmp_path / "rot.jpg"))
    assert loaded.size == (40, 80)


def test_smart_resize_matches_reference():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    rng = np.random.default_rng(0)
    sizes = [(1, 1), (15, 17), (32, 32), (48, 80), (4000, 5000), (3584, 3584), (10, 1900)]
    sizes += [tuple(int(v) for v in rng.integers(1, 6000, 2)) for _ in range(300)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for bounds in ((3136, 12845056), (128 * 32 * 32, 768 * 32 * 32)):
            assert I.smart_resize(h, w, 32, *bounds) == ref(h, w, 32, *bounds), (h, w, bounds)


def test_settings_from_preprocessor_config(tmp_path):
    import json

    cfg = {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "image_processor_type": "Qwen2VLImageProcessor",
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert I.VisionSettings.from_preprocessor_config(tmp_path) == I.VisionSettings()
    assert I.VisionSettings.from_preprocessor_config({**cfg, "max_pixels": 1024}).max_pixels == 1024


def test_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        I.process_images([str(tmp_path / "missing.png")])
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(I.ImageLoadError, match="zero.png.*empty"):
        I.process_images([str(tmp_path / "zero.png")])
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((50, 50, 3), np.uint8) + 7).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(I.ImageLoadError, match="trunc.png.*corrupt"):
        I.process_images([str(tmp_path / "trunc.png")])
    (tmp_path / "noise.jpg").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(I.ImageLoadError, match="noise.jpg"):
        I.process_images([str(tmp_path / "noise.jpg")])
    with pytest.raises(I.ImageLoadError, match="zero-size"):
        I.process_images([np.zeros((0, 10, 3), np.uint8)])
    with pytest.raises(I.ImageLoadError, match="image #0.*uint8"):
        I.process_images([np.zeros((10, 10, 3), np.float32)])
    with pytest.raises(I.ImageLoadError, match="aspect ratio"):
        I.process_images([np.zeros((2, 500, 3), np.uint8)])
