"""Chat prompts for Qwen3-Omni: chat template, placeholder expansion, tokenisation, batching.

Reproduces ``Qwen3OmniMoeProcessor.apply_chat_template(..., tokenize=True, return_dict=True)``
(transformers 5.23.0) without transformers or torch:

1. the Jinja chat template is rendered like ``transformers.utils.chat_template_utils``
   (sandboxed environment with ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, the same
   ``tojson``/``raise_exception``/``strftime_now``/``namespace`` helpers, the tokenizer's special
   tokens as template variables, messages reduced to plain JSON data);
2. media are collected from the content blocks in conversation order and processed
   (``audio.py``, ``image.py``, ``video.py``);
3. each ``<|audio_pad|>``, ``<|image_pad|>`` and ``<|video_pad|>`` placeholder is expanded, in
   text order across the batch, to the number of encoder tokens of its media item:
   ``audio_output_length(frames)`` audio tokens, ``t*h*w / merge_size**2`` vision tokens, and with
   ``use_audio_in_video`` a video's placeholder becomes ``<|audio_start|>`` + its video and
   sound-track tokens merged in time order + ``<|audio_end|>`` (``replace_video_with_audio_token``);
4. the texts are tokenised with the ``tokenizers`` library and left-padded.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .audio import N_WINDOW, audio_output_length, load_audio, log_mel_features
from .image import VisionSettings, process_images
from .video import VideoSettings, load_video_audio, process_videos

__all__ = [
    "AUDIO_TOKEN",
    "IMAGE_TOKEN",
    "VIDEO_TOKEN",
    "AUDIO_BOS_TOKEN",
    "AUDIO_EOS_TOKEN",
    "VISION_BOS_TOKEN",
    "VISION_EOS_TOKEN",
    "POSITION_ID_PER_SECONDS",
    "TextAssets",
    "load_text_assets",
    "render_chat_template",
    "video_with_audio_placeholder",
    "expand_placeholders",
    "process_messages",
]

AUDIO_TOKEN = "<|audio_pad|>"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
AUDIO_BOS_TOKEN = "<|audio_start|>"
AUDIO_EOS_TOKEN = "<|audio_end|>"
VISION_BOS_TOKEN = "<|vision_start|>"
VISION_EOS_TOKEN = "<|vision_end|>"
# Temporal position ids per second of video; one audio token is ~1/13 s, so time in "position ids"
# is the audio token index (checkpoint value and processor default; the thinker config class
# default of 25 is stale).
POSITION_ID_PER_SECONDS = 13.0


# ----------------------------------------------------------------------------------------------
# Tokenizer and template assets
# ----------------------------------------------------------------------------------------------


@dataclass
class TextAssets:
    """What the text side needs: the tokenizer, the chat template, special tokens, the pad id."""

    tokenizer: object  # tokenizers.Tokenizer
    chat_template: str | None = None
    special_tokens: dict = field(default_factory=dict)  # template variables: eos_token, pad_token, ...
    pad_token_id: int | None = None


def _token_content(tok):
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def load_text_assets(path) -> TextAssets:
    """Load ``tokenizer.json``, the chat template and the special tokens from a checkpoint folder.

    The template is taken from ``chat_template.jinja``, ``chat_template.json`` (``{"chat_template": ...}``)
    or ``tokenizer_config.json["chat_template"]``, in that order. ``path`` may also be the
    ``tokenizer.json`` file itself (then there is no template unless one sits next to it).
    """
    from tokenizers import Tokenizer

    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    tok_file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(tok_file):
        raise FileNotFoundError(
            f"No tokenizer file at '{tok_file}'. Pass a checkpoint folder containing tokenizer.json, or the file itself."
        )
    try:
        tokenizer = Tokenizer.from_file(tok_file)
    except Exception as e:
        raise ValueError(f"Could not load tokenizer '{tok_file}': {e}. Expected a Hugging Face tokenizer.json.") from e

    config = {}
    cfg_file = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            config = json.load(f)

    template = None
    jinja_file = os.path.join(folder, "chat_template.jinja")
    json_file = os.path.join(folder, "chat_template.json")
    if os.path.isfile(jinja_file):
        with open(jinja_file) as f:
            template = f.read()
    elif os.path.isfile(json_file):
        with open(json_file) as f:
            template = json.load(f).get("chat_template")
    elif isinstance(config.get("chat_template"), str):
        template = config["chat_template"]

    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        value = _token_content(config.get(key))
        if value is not None:
            special[key] = value
    extra = config.get("extra_special_tokens") or {}
    if isinstance(extra, dict):
        special.update({k: _token_content(v) for k, v in extra.items()})
    pad_id = tokenizer.token_to_id(special["pad_token"]) if "pad_token" in special else None
    return TextAssets(tokenizer=tokenizer, chat_template=template, special_tokens=special, pad_token_id=pad_id)


# ----------------------------------------------------------------------------------------------
# Chat template rendering
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _compile_template(chat_template: str):
    import datetime

    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; when
        # rendering a prompt it is transparent, as in the reference.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; the reference overrides it with plain json.dumps.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"Chat templates cannot set namespace attribute {name!r}.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(chat_template)


def _plain(value):
    """Reduce template inputs to JSON-like data; other objects (arrays, images) become "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _as_batch(messages_batch) -> tuple[list, bool]:
    if isinstance(messages_batch, dict) or not isinstance(messages_batch, (list, tuple)):
        raise TypeError(
            "Expected a conversation (a list of {'role': ..., 'content': ...} messages) or a list of conversations."
        )
    if len(messages_batch) == 0:
        raise ValueError("Got no messages; pass a conversation or a non-empty list of conversations.")
    if isinstance(messages_batch[0], dict):
        return [list(messages_batch)], False
    return [list(c) for c in messages_batch], True


def render_chat_template(
    messages_batch,
    chat_template: str,
    add_generation_prompt: bool = True,
    special_tokens: dict | None = None,
    **template_kwargs,
) -> list[str]:
    """Render conversations to prompt strings as ``apply_chat_template(tokenize=False)`` does.

    Args:
      messages_batch: one conversation or a list of them, in the reference format
        ``[{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "..."}]}]``.
      chat_template: the Jinja template string (e.g. ``load_text_assets(dir).chat_template``).
      add_generation_prompt: end with the assistant header (``<|im_start|>assistant\\n``).
      special_tokens: template variables from the tokenizer (``eos_token``, ``pad_token``, ...).
      **template_kwargs: extra template variables (e.g. ``enable_thinking``).

    Returns:
      one prompt string per conversation, placeholders not yet expanded.
    """
    if not chat_template:
        raise ValueError(
            "No chat template: pass the checkpoint's template (load_text_assets(checkpoint_dir).chat_template)."
        )
    conversations, _ = _as_batch(messages_batch)
    template = _compile_template(chat_template)
    variables = _plain({**(special_tokens or {}), **template_kwargs})
    rendered = []
    for i, conv in enumerate(conversations):
        conv = _plain(conv)
        for message in conv:
            if not isinstance(message, dict):
                raise TypeError(f"Conversation #{i}: messages must be dicts with 'role' and 'content', got {message!r}.")
        rendered.append(
            template.render(
                messages=conv, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
            )
        )
    return rendered


# ----------------------------------------------------------------------------------------------
# Placeholder expansion
# ----------------------------------------------------------------------------------------------


def video_with_audio_placeholder(
    video_grid_thw,
    second_per_grid: float,
    num_audio_tokens: int,
    merge_size: int = 2,
    position_id_per_seconds: float = POSITION_ID_PER_SECONDS,
) -> str:
    """Replacement text of a video placeholder when its sound track is used (``use_audio_in_video``).

    ``<|audio_start|>`` + video and audio tokens in time order + ``<|audio_end|>``. Times are in
    position ids: video token ``(t, h, w)`` sits at ``t * second_per_grid * 13``, audio token ``k``
    at ``k``; a video token goes first when its time is ``<=`` the next audio token's
    (``replace_video_with_audio_token``). With the template's ``<|vision_start|>``/``<|vision_end|>``
    around the placeholder, the media part is bracketed by two tokens on each side.
    """
    t, h, w = (int(v) for v in video_grid_thw)
    per_t = (h // merge_size) * (w // merge_size)
    video_times = np.repeat(np.arange(t), per_t) * float(second_per_grid) * float(position_id_per_seconds)
    audio_times = np.arange(int(num_audio_tokens))
    # Merge of two sorted sequences with ties going to video: before audio token k come all video
    # tokens with time <= k, i.e. searchsorted(..., side="right").
    n_video_before = np.searchsorted(video_times, audio_times, side="right")
    pieces = [AUDIO_BOS_TOKEN]
    done = 0
    for k in range(len(audio_times)):
        if n_video_before[k] > done:
            pieces.append(VIDEO_TOKEN * int(n_video_before[k] - done))
            done = int(n_video_before[k])
        pieces.append(AUDIO_TOKEN)
    if done < len(video_times):
        pieces.append(VIDEO_TOKEN * (len(video_times) - done))
    pieces.append(AUDIO_EOS_TOKEN)
    return "".join(pieces)


def expand_placeholders(
    texts: list[str],
    audio_replacements: list[str] = (),
    image_replacements: list[str] = (),
    video_replacements: list[str] = (),
) -> list[str]:
    """Replace placeholders in text order across the batch, one replacement string per media item.

    The i-th ``<|audio_pad|>`` (resp. image, video) occurrence, counting through ``texts`` in
    order, becomes ``audio_replacements[i]``; a modality with no replacements is left untouched,
    as in the reference ``get_text_with_replacements``. Raises if the counts disagree.
    """
    groups = []
    for name, token, reps in (
        ("image", IMAGE_TOKEN, image_replacements),
        ("video", VIDEO_TOKEN, video_replacements),
        ("audio", AUDIO_TOKEN, audio_replacements),
    ):
        found = sum(t.count(token) for t in texts)
        if len(reps) and found != len(reps):
            raise ValueError(
                f"The prompts contain {found} {token} placeholders but {len(reps)} {name} inputs were given; "
                f"the chat template must emit exactly one {token} per {name} content block."
            )
        if len(reps):
            groups.append(f"(?P<{name}>{re.escape(token)})")
    if not groups:
        return list(texts)
    pattern = re.compile("|".join(groups))
    iters = {"image": iter(image_replacements), "video": iter(video_replacements), "audio": iter(audio_replacements)}
    return [pattern.sub(lambda m: next(iters[m.lastgroup]), t) for t in texts]


# ----------------------------------------------------------------------------------------------
# The whole pipeline
# ----------------------------------------------------------------------------------------------


def _media_value(block: dict, keys: tuple[str, ...], where: str):
    for key in keys:
        if block.get(key) is not None:
            return block[key]
    raise ValueError(f"{where}: a {block.get('type')!r} block needs one of the keys {list(keys)}, got {sorted(block)}.")


def process_messages(
    messages_batch,
    tokenizer,
    chat_template: str | None = None,
    *,
    use_audio_in_video: bool = False,
    fps: float | None = None,
    image_settings: VisionSettings | None = None,
    video_settings: VideoSettings | None = None,
    special_tokens: dict | None = None,
    pad_token_id: int | None = None,
    add_generation_prompt: bool = True,
    n_window: int = N_WINDOW,
    position_id_per_seconds: float = POSITION_ID_PER_SECONDS,
    **template_kwargs,
) -> dict:
    """Chat messages -> numpy model inputs with the reference processor's names.

    Args:
      messages_batch: one conversation or a list of conversations. Content blocks:
        ``{"type": "text", "text": ...}``; ``{"type": "audio", "audio": path_or_16k_array}``
        (optional ``"sampling_rate"`` for arrays); ``{"type": "image", "image": path_or_PIL_or_uint8}``;
        ``{"type": "video", "video": path}`` (optional per-video ``"fps"``) or
        ``{"type": "video", "video": uint8 (n, H, W, 3) frames, "fps": frames_rate}``.
        ``url``/``path`` keys are accepted like the reference; remote URLs are not downloaded.
      tokenizer: a ``TextAssets`` (from ``load_text_assets``), a ``tokenizers.Tokenizer``, or a path
        to a checkpoint folder / ``tokenizer.json``.
      chat_template: Jinja template; defaults to the one in ``tokenizer`` when it is ``TextAssets``.
      use_audio_in_video: use each video's sound track, interleaved with its frames (one flag for
        the whole batch: the reference cannot mix settings across turns either).
      fps: video sampling rate (default ``video_settings.fps`` = 2.0).
      image_settings, video_settings: processor settings (defaults: Qwen3-Omni's).
      special_tokens: template variables; default from ``TextAssets``.
      pad_token_id: left-padding id; default the tokenizer's pad token (``<|endoftext|>`` for Qwen).
      add_generation_prompt: end each prompt with the assistant header.
      n_window: audio encoder ``n_window`` (50) for the audio token count.
      position_id_per_seconds: 13 for Qwen3-Omni; orders audio and video tokens in time.

    Returns:
      dict of numpy arrays: ``input_ids`` int64 (B, S) and ``attention_mask`` int64 (B, S), left
      padded; when present in the batch, ``input_features`` float32 (B_audio, 128, T_max) with
      ``feature_attention_mask`` int32 (B_audio, T_max) for all audios (sound tracks included, in
      content order), ``pixel_values`` float32 (N, 1536) with ``image_grid_thw`` int64 (n_images, 3),
      ``pixel_values_videos`` float32 (N, 1536) with ``video_grid_thw`` int64 (n_videos, 3) and
      ``video_second_per_grid`` float32 (n_videos,), and ``use_audio_in_video`` (bool).
    """
    from tokenizers import Tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_text_assets(tokenizer)
    if isinstance(tokenizer, TextAssets):
        chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        special_tokens = special_tokens if special_tokens is not None else tokenizer.special_tokens
        pad_token_id = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
        tokenizer = tokenizer.tokenizer
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be TextAssets, tokenizers.Tokenizer or a path, got {type(tokenizer).__name__}.")
    special_tokens = dict(special_tokens or {})
    if pad_token_id is None:
        pad_token = special_tokens.get("pad_token", "<|endoftext|>")
        pad_token_id = tokenizer.token_to_id(pad_token)
        if pad_token_id is None:
            raise ValueError(
                f"The tokenizer has no pad token {pad_token!r}; pass pad_token_id= or special_tokens={{'pad_token': ...}}."
            )
    image_settings = image_settings or VisionSettings()
    video_settings = video_settings or VideoSettings.from_vision_settings(image_settings)

    conversations, _ = _as_batch(messages_batch)

    # 1. Collect media in content order (the reference's `_multimodal_inputs_from_conversations`):
    # images and videos in order; audio slots in order, with a video's sound track taking a slot at
    # the video's position when use_audio_in_video is set.
    images, videos, audio_slots = [], [], []  # audio slot: ("audio", waveform) or ("video", video index)
    for c, conv in enumerate(conversations):
        for m, message in enumerate(conv):
            content = message.get("content") if isinstance(message, dict) else None
            if content is None or isinstance(content, str):
                continue
            for b, block in enumerate(content):
                where = f"conversation #{c}, message #{m}, block #{b}"
                if not isinstance(block, dict) or "type" not in block:
                    raise ValueError(f"{where}: content blocks must be dicts with a 'type' key, got {block!r}.")
                kind = block["type"]
                if kind == "text":
                    continue
                if kind == "image":
                    value = _media_value(block, ("image", "url", "path", "base64"), where)
                    if block.get("base64") is value and not str(value).startswith("data:"):
                        value = "data:image/unknown;base64," + value
                    images.append(value)
                elif kind == "video":
                    value = _media_value(block, ("video", "url", "path"), where)
                    if isinstance(value, np.ndarray):
                        if not block.get("fps"):
                            raise ValueError(f"{where}: a video given as a frames array needs an 'fps' key (its frame rate).")
                        value = (value, float(block["fps"]))
                    videos.append((value, block.get("fps") if not isinstance(value, tuple) else None))
                    if use_audio_in_video:
                        audio_slots.append(("video", len(videos) - 1))
                elif kind == "audio":
                    value = _media_value(block, ("audio", "url", "path"), where)
                    audio_slots.append(("audio", load_audio(value, sampling_rate=block.get("sampling_rate"))))
                else:
                    raise ValueError(f"{where}: unknown content type {kind!r}; expected text, audio, image or video.")

    out = {}
    # 2. Vision.
    image_reps = []
    if images:
        img = process_images(images, image_settings)
        out.update(img)
        m2 = image_settings.merge_size**2
        image_reps = [IMAGE_TOKEN * int(np.prod(g) // m2) for g in img["image_grid_thw"]]

    video_out = None
    if videos:
        per_video = []
        for value, video_fps in videos:
            per_video.append(
                process_videos([value], fps=video_fps if video_fps is not None else fps, settings=video_settings)
            )
        video_out = {
            "pixel_values_videos": np.concatenate([v["pixel_values_videos"] for v in per_video], axis=0),
            "video_grid_thw": np.concatenate([v["video_grid_thw"] for v in per_video], axis=0),
            "video_second_per_grid": np.concatenate([v["video_second_per_grid"] for v in per_video], axis=0),
        }
        sampled_fps = np.concatenate([v["sampled_fps"] for v in per_video])
        out.update(video_out)

    # 3. Audio (standalone clips and sound tracks), one feature batch for all of them.
    waveforms, video_to_audio = [], [None] * len(videos)
    standalone = []  # indices into waveforms of standalone audios, in order
    for kind, value in audio_slots:
        if kind == "audio":
            standalone.append(len(waveforms))
            waveforms.append(value)
        else:
            source = videos[value][0]
            track = None if isinstance(source, tuple) else load_video_audio(source)
            if track is not None:  # a silent video keeps plain video tokens, as in the reference
                video_to_audio[value] = len(waveforms)
                waveforms.append(track)
    audio_reps, num_audio_tokens = [], None
    if waveforms:
        features, feature_mask = log_mel_features(waveforms)
        out["input_features"] = features
        out["feature_attention_mask"] = feature_mask
        num_audio_tokens = audio_output_length(feature_mask.sum(-1).astype(np.int64), n_window)
        audio_reps = [AUDIO_TOKEN * int(num_audio_tokens[i]) for i in standalone]

    video_reps = []
    if videos:
        m2 = video_settings.merge_size**2
        for v, grid in enumerate(video_out["video_grid_thw"]):
            if video_to_audio[v] is not None:
                # Python-float seconds per grid, as the reference processor computes them.
                spg = video_settings.temporal_patch_size / float(sampled_fps[v])
                video_reps.append(
                    video_with_audio_placeholder(
                        grid,
                        spg,
                        int(num_audio_tokens[video_to_audio[v]]),
                        video_settings.merge_size,
                        position_id_per_seconds,
                    )
                )
            else:
                video_reps.append(VIDEO_TOKEN * int(np.prod(grid) // m2))
    if videos:
        out["use_audio_in_video"] = bool(use_audio_in_video)

    # 4. Text: render, expand, tokenise, left-pad.
    texts = render_chat_template(
        conversations, chat_template, add_generation_prompt, special_tokens=special_tokens, **template_kwargs
    )
    texts = expand_placeholders(texts, audio_reps, image_reps, video_reps)
    bos = special_tokens.get("bos_token")
    # The reference does not add special tokens when the rendered prompt already starts with BOS.
    add_special = not (bos is not None and texts[0].startswith(bos))
    encodings = tokenizer.encode_batch(texts, add_special_tokens=add_special)
    seq_len = max(len(e.ids) for e in encodings)
    input_ids = np.full((len(encodings), seq_len), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(encodings), seq_len), dtype=np.int64)
    for i, e in enumerate(encodings):
        n = len(e.ids)
        if n:
            input_ids[i, seq_len - n :] = e.ids
            attention_mask[i, seq_len - n :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, **out}
