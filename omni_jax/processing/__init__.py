"""Input processors for Qwen3-Omni: numpy/librosa/PyAV/PIL/tokenizers only (no JAX, no PyTorch).

Outputs use the names of ``transformers``' ``Qwen3OmniMoeProcessor`` so they can be passed to the
model unchanged: ``input_ids``, ``attention_mask``, ``input_features``, ``feature_attention_mask``,
``pixel_values``, ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``,
``video_second_per_grid``, ``use_audio_in_video``.

Modules: ``audio`` (loading, log-mel features, audio token counts), ``image`` (resize, normalise,
patchify), ``video`` (decode, sample, patchify, sound track), ``prompt`` (chat template,
placeholder expansion, tokenisation; ``process_messages`` runs the whole pipeline).
"""

from .batching import concat_media
from .audio import AudioLoadError, audio_output_length, load_audio, log_mel_features
from .image import ImageLoadError, VisionSettings, load_image, process_images, smart_resize
from .prompt import (
    TextAssets,
    expand_placeholders,
    load_text_assets,
    process_messages,
    render_chat_template,
    video_with_audio_placeholder,
)
from .video import VideoLoadError, VideoSettings, load_video_audio, process_videos, read_video, sample_frame_indices

__all__ = [
    "AudioLoadError",
    "ImageLoadError",
    "VideoLoadError",
    "VisionSettings",
    "VideoSettings",
    "TextAssets",
    "load_audio",
    "log_mel_features",
    "audio_output_length",
    "load_image",
    "smart_resize",
    "process_images",
    "read_video",
    "sample_frame_indices",
    "load_video_audio",
    "process_videos",
    "load_text_assets",
    "render_chat_template",
    "expand_placeholders",
    "video_with_audio_placeholder",
    "process_messages",
    "concat_media",
]
