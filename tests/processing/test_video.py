"""omni_jax.processing.video against the reference video pipeline.

The reference ``Qwen2VLVideoProcessor`` cannot be instantiated here: its module imports
torchvision, which is not installed. So the test runs the reference's own source where it can:
``sample_frames`` and ``patchify`` are lifted out of the class (parsed from the installed
transformers file and executed with torch), frames are decoded with the reference
``read_video_pyav``, and each frame is resized/rescaled/normalised by the reference PIL image
processor with the video pixel bounds. The one step not covered is the reference's torchvision
resize: omni_jax resizes video frames with PIL bicubic, like the reference image processor.
"""

from __future__ import annotations

import ast
import importlib.util
import math
from types import SimpleNamespace

import numpy as np
import pytest

from omni_jax.processing import video as V
from omni_jax.processing.audio import load_audio

VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 32 * 32, 768 * 32 * 32


@pytest.fixture(scope="module")
def ref_video_fns():
    """``sample_frames`` and ``patchify`` from the installed Qwen2VLVideoProcessor source."""
    import torch
    from transformers.video_utils import VideoMetadata

    spec = importlib.util.find_spec("transformers.models.qwen2_vl.video_processing_qwen2_vl")
    with open(spec.origin) as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fns = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in ("sample_frames", "patchify")]
    assert len(fns) == 2
    ns = {"math": math, "torch": torch, "VideoMetadata": VideoMetadata}
    exec(compile(ast.Module(body=fns, type_ignores=[]), spec.origin, "exec"), ns)
    this = SimpleNamespace(num_frames=None, fps=None, temporal_patch_size=2, min_frames=4, max_frames=768)

    def sample(total, video_fps, fps):
        meta = VideoMetadata(total_num_frames=total, fps=video_fps)
        return ns["sample_frames"](this, meta, fps=fps).numpy()

    def patchify(frames):  # (T, C, H, W) float32 -> (N, 1536)
        out, *_ = ns["patchify"](this, torch.from_numpy(frames)[None], patch_size=16, merge_size=2, temporal_patch_size=2)
        return out[0].numpy()

    return SimpleNamespace(sample=sample, patchify=patchify, VideoMetadata=VideoMetadata)


def _ref_pixels(ip, frames: np.ndarray) -> np.ndarray:
    """Reference PIL image-processor steps per frame, with the video pixel bounds: (T, 3, H', W') float32."""
    from transformers.image_utils import PILImageResampling, SizeDict

    size = SizeDict(shortest_edge=VIDEO_MIN_PIXELS, longest_edge=VIDEO_MAX_PIXELS)
    out = []
    for frame in frames:
        x = np.ascontiguousarray(frame.transpose(2, 0, 1))
        x = ip.resize(x, size=size, resample=PILImageResampling.BICUBIC, factor=32)
        x = ip.rescale(x, 1 / 255)
        out.append(ip.normalize(x, [0.5] * 3, [0.5] * 3))
    return np.stack(out).astype(np.float32)


def test_sample_indices_equal_reference_sample_frames(ref_video_fns):
    cases = [(t, vfps, fps) for t in (1, 2, 3, 7, 8, 30, 61, 120, 301, 2000) for vfps in (1.0, 2.5, 24.0, 29.97, 30.0) for fps in (0.5, 1, 2, 2.5, 3)]
    for total, vfps, fps in cases:
        try:
            ref = ref_video_fns.sample(total, vfps, fps)
        except ZeroDivisionError:  # the reference cannot sample a 1-frame video; we keep it (and pad)
            assert total == 1
            np.testing.assert_array_equal(V.sample_frame_indices(total, vfps, fps), [0])
            continue
        np.testing.assert_array_equal(V.sample_frame_indices(total, vfps, fps), ref, err_msg=str((total, vfps, fps)))


@pytest.mark.parametrize("native_fps", [1, 2, 2.5, 3])
def test_decode_and_pixels_match_reference(tmp_path, media, ref_video_fns, ref_image_processor, native_fps):
    """Files at 1, 2, 2.5 and 3 fps sampled at the default 2 fps: same frames, same pixel values."""
    from transformers.video_utils import read_video_pyav

    path = media.write_video(tmp_path / f"v{native_fps}.mp4", fps=native_fps, seconds=4.0)
    ours = V.read_video(path)  # default fps 2
    ref_frames, meta = read_video_pyav(path, lambda metadata, **kw: ref_video_fns.sample(metadata.total_num_frames, metadata.fps, 2.0))
    np.testing.assert_array_equal(ours.indices, meta.frames_indices)
    np.testing.assert_array_equal(ours.frames, ref_frames)
    assert ours.total_frames == meta.total_num_frames and ours.video_fps == meta.fps

    out = V.process_videos([path])
    ref_pixels = ref_video_fns.patchify(_ref_pixels(ref_image_processor, ref_frames))
    assert out["pixel_values_videos"].shape == ref_pixels.shape
    np.testing.assert_allclose(out["pixel_values_videos"], ref_pixels, rtol=0, atol=1e-6)
    n = len(ours.indices)
    # 64x64 frames grow to the video minimum of 128 tokens per frame: 384x384 -> 24x24 patches.
    assert out["video_grid_thw"].tolist() == [[n // 2, 24, 24]]
    assert out["sampled_fps"][0] == pytest.approx(n * native_fps / ours.total_frames)
    assert out["video_second_per_grid"][0] == pytest.approx(2 / out["sampled_fps"][0])


@pytest.mark.parametrize("fps", [1, 2, 2.5, 3])
def test_second_per_grid_follows_sampling_fps(tmp_path, media, fps):
    path = media.write_video(tmp_path / "v10.mp4", fps=10, seconds=4.0, audio_sr=None)
    out = V.process_videos([path], fps=fps)
    n = int(4 * fps)  # 4, 8, 10, 12 frames: even, inside the frame bounds
    assert out["video_grid_thw"][0, 0] == n // 2
    assert out["sampled_fps"][0] == pytest.approx(fps)
    # 2, 1, 0.8, 0.667 s per temporal patch, the value the reference gets with videos_kwargs={"fps": fps}.
    assert out["video_second_per_grid"][0] == np.float32(2 / fps)


def test_frames_input_and_odd_frame_count(media, ref_video_fns, ref_image_processor):
    frames = np.stack([media.drawn_image(50, 70, seed=i) for i in range(5)])
    out = V.process_videos([(frames, 2.5)])
    ref = ref_video_fns.patchify(_ref_pixels(ref_image_processor, frames))  # reference pads by repeating the last frame
    np.testing.assert_allclose(out["pixel_values_videos"], ref, rtol=0, atol=1e-6)
    assert out["video_grid_thw"][0, 0] == 3
    assert out["video_second_per_grid"][0] == np.float32(0.8)


def test_sound_track(tmp_path, media):
    path = media.write_video(tmp_path / "av.mp4", fps=2, seconds=3.0, audio_sr=44100)
    track = V.load_video_audio(path)
    assert track.dtype == np.float32 and abs(track.size - 48000) < 1200  # AAC adds priming samples
    np.testing.assert_array_equal(track, load_audio(path))  # the same decode + soxr pipeline
    out = V.process_videos([path], load_audio=True)
    np.testing.assert_array_equal(out["video_audio"][0], track)
    silent = media.write_video(tmp_path / "silent.mp4", fps=2, seconds=2.0, audio_sr=None)
    assert V.load_video_audio(silent) is None
    assert V.process_videos([silent], load_audio=True)["video_audio"] == [None]


def test_errors_name_the_file(tmp_path, media):
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        V.process_videos([str(tmp_path / "gone.mp4")])
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(V.VideoLoadError, match="bad.mp4.*corrupt"):
        V.process_videos([str(bad)])
    good = media.write_video(tmp_path / "good.mp4", fps=2, seconds=2.0)
    trunc = tmp_path / "trunc.mp4"
    trunc.write_bytes(open(good, "rb").read()[:300])
    with pytest.raises(V.VideoLoadError, match="trunc.mp4"):
        V.process_videos([str(trunc)])
    wav = media.write_audio(tmp_path / "sound.wav", 1.0, 16000)
    with pytest.raises(V.VideoLoadError, match="sound.wav.*no video stream"):
        V.process_videos([wav])
    with pytest.raises(V.VideoLoadError, match="uint8"):
        V.process_videos([(np.zeros((4, 8, 8, 3), np.float32), 2.0)])
    with pytest.raises(V.VideoLoadError, match="fps > 0"):
        V.process_videos([(np.zeros((4, 8, 8, 3), np.uint8), 0)])
