"""Batch inference: JSONL requests in, JSONL results and 24 kHz wav files out.

    python infer.py --ckpt DIR --requests requests.jsonl --out OUT_DIR [--batch-size N]
                    [--max-new-tokens N] [--greedy] [--no-audio] [--speaker NAME] [--stream]
    python infer.py                      # embedded default: tiny preset, seeded RANDOM weights

Requests. One JSON object per line, either pre-tokenized input, {"id": ..., "input_ids": [...]}, or
chat messages in the reference's conversation format, {"id": ..., "messages": [...]}, which needs a
tokenizer.json and chat template (the checkpoint's, or --tokenizer DIR). Content parts may be
{"type": "text", "text": ...}, {"type": "audio", "audio": "a.wav"}, {"type": "image", "image": "b.png"}
and {"type": "video", "video": "c.mp4"} (optional "fps"); relative paths are relative to the
requests file. Optional request keys: "speaker" (the voice; overrides --speaker) and
"use_audio_in_video" (use each video's sound track; default false, as the reference processor).

Results. <out>/results.jsonl gets one line per request, in file order: "id", "prompt_tokens",
"generated_ids", "finish_reason", "text" (with a tokenizer), and when speech was made "audio" (the
wav's path relative to the results folder), "sample_rate" (24000), "audio_samples" and, with
--stream, "time_to_first_audio_s". A request that cannot be served gets an "error" line naming the
cause (a missing, corrupt or empty media file is named) and the others go on; the exit code is
then 1.

Speech. With a checkpoint that has a talker and Code2Wav (Instruct; the tiny preset) and without
--no-audio, every request is also spoken: <out>/<id>.wav, mono float32 wav at 24 kHz (written with
soundfile; the samples exactly as the model produced them). The voice is the request's "speaker",
else --speaker, else "Ethan"; an unknown name is an error listing the valid ones. A checkpoint
without a talker (Thinking, Captioner) writes text only and says so; asking it for speech
explicitly (--speaker, or a request's "speaker") is an error (use --no-audio to ignore request
speakers). Speech needs a chat prompt: a pre-tokenized request without '<|im_start|>assistant'
gets text only and a "note". --stream writes each wav progressively as codec frames are decoded
(--chunk-frames frames at a time) and reports the seconds from the start of the request's batch
to its first audio samples ("time_to_first_audio_s": prompt encoding, thinker generation, the
talker's first chunk and its first Code2Wav step; compilation included in the first batch).
Without --stream the audio is the reference's chunked Code2Wav decode (300-frame chunks, 25 frames
of left context); --stream gives the seamless full decode. They are the same audio up to 300 codec
frames (24 s); past that the reference loses 555 samples at each 300-frame seam, the stream loses
none. --max-audio-frames caps the codec frames per request (12.5 per second of audio).

Batching. Requests are served in batches of up to --batch-size, in file order within a group;
a batch holds only requests that agree on (speech or text only, use_audio_in_video for requests
with a video), because the model takes one return_audio and one use_audio_in_video per call.
Text-only and media requests share batches otherwise (the model handles rows with different
media). Each request's media are processed on their own and the batch concatenates them, so a
request's inputs do not depend on its neighbours (the reference processor pads a batch's audio
before its STFT, which would). If a batch fails, its requests are retried one at a time, so a
failing request costs only itself.

Multi-host. Several processes (hosts of a TPU pod slice, nodes or GPUs of a cluster) share one request
file: `omni_jax.distributed.initialize` joins them first thing (automatic on TPU pods, SLURM and Open
MPI; --coordinator-address/--num-processes/--process-id otherwise). Each process then serves its own
share of the requests (request i goes to process i mod N) with its own copy of the model on its own
devices (--mesh DATA,EXPERT,TENSOR over the process's local devices; default 1,1,1: its first one),
so no traffic crosses hosts while generating. Each process writes the wav files of its requests into
its own --out folder; process 0 gathers every result and alone writes results.jsonl (with a
"process" key naming who served the request, and so on which host its wav is). Every process exits
with the same code. Greedy results do not depend on the number of processes; sampled ones do (a
batch's seed is --seed + (its number x processes + process index) x --batch-size).

Presets (no --ckpt) use seeded RANDOM weights: the text is random tokens and the audio noise
(near-silent for the tiny preset), and --max-audio-frames defaults to 16 there. A talker vocabulary
smaller than 1024 + the codebook (none of the presets) would put codes inside the reference's
suppression window ([vocab - 1024, vocab)) and leave only the codec EOS; infer.py then suppresses the
non-code ids [codebook size, vocab) except EOS instead (the same set as the reference's window for the
published model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

import numpy as np

SAMPLE_RATE = 24_000
PRESET_AUDIO_FRAMES = 16

# Chat-formatted token ids for the tiny preset (<|im_start|> 508, user 507, <|im_end|> 509, assistant 497).
BUILTIN_REQUESTS = [
    {"id": "builtin-0", "input_ids": [508, 507, 12, 47, 301, 88, 9, 250, 17, 33, 460, 509, 508, 497]},
    {"id": "builtin-1", "input_ids": [508, 507, 40, 41, 42, 43, 509, 508, 497]},
]

MEDIA_KEYS = (
    "input_features", "feature_attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
    "video_grid_thw", "video_second_per_grid",
)
MEDIA_TYPES = ("audio", "image", "video")


@dataclasses.dataclass
class Request:
    id: str
    line: int
    input_ids: list[int] | None = None
    media: dict | None = None  # this request's processor outputs (MEDIA_KEYS present), None for text
    has_video: bool = False
    use_audio_in_video: bool = False
    speaker: str | None = None  # the voice; None = text only
    note: str | None = None
    error: str | None = None


@dataclasses.dataclass
class Context:
    """What preparing a request needs (built once)."""

    config: object  # OmniConfig
    assets: object | None  # processing.TextAssets
    base_dir: str  # media paths are relative to this (the requests file's folder)
    speech: bool  # the checkpoint can speak and --no-audio was not given
    default_speaker: str
    no_audio: bool
    image_settings: object | None = None
    video_settings: object | None = None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="Hugging Face or omni_jax checkpoint folder (default: --preset with random weights)")
    p.add_argument("--preset", default=None, help="named preset with seeded random weights (default: tiny)")
    p.add_argument("--tokenizer", default=None,
                   help="folder with tokenizer.json and the chat template (and preprocessor_config.json) for chat "
                        "requests (default: the checkpoint folder)")
    p.add_argument("--requests", help="JSONL request file (default: built-in requests)")
    p.add_argument("--out", default="out", help="output folder for results.jsonl and the wav files (default: ./out)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="greedy decoding, text and speech (default: sampling)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="parameter/compute dtype (default: bfloat16 for checkpoints, float32 for presets)")
    p.add_argument("--no-audio", action="store_true", help="text output only (request speakers are ignored)")
    p.add_argument("--speaker", default=None, help="voice for every request without its own 'speaker' (default: Ethan)")
    p.add_argument("--stream", action="store_true",
                   help="write each wav progressively and report the time to the first audio packet")
    p.add_argument("--chunk-frames", type=int, default=8, help="codec frames per streamed audio packet (default: 8)")
    p.add_argument("--max-audio-frames", type=int, default=None,
                   help="codec frames per request at most (12.5 per second; default: 4095, the reference's; "
                        f"{PRESET_AUDIO_FRAMES} for presets)")
    p.add_argument("--skip-absent-components", action="store_true",
                   help="load a checkpoint even if it holds components its configuration leaves out")
    p.add_argument("--mesh", default=None, metavar="DATA,EXPERT,TENSOR",
                   help="mesh of this process's local devices the model is sharded over (default 1,1,1: the first "
                        "local device)")
    from omni_jax.distributed import add_distributed_args  # noqa: PLC0415 - light import, no JAX device touched

    add_distributed_args(p)
    return p.parse_args(argv)


def parse_mesh(value: str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.split(","))
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"--mesh {value!r}: expected three positive sizes DATA,EXPERT,TENSOR, e.g. 1,1,4") from None
    return shape


# ------------------------------------------------------------------------------------------- requests
def read_requests(path: str | None) -> list[dict | Request]:
    """Parses the request file; a malformed line becomes a Request carrying its error."""
    if path is None:
        return [dict(r, _line=i + 1) for i, r in enumerate(BUILTIN_REQUESTS)]
    if not os.path.exists(path):
        raise FileNotFoundError(f"request file {path!r} does not exist")
    out: list[dict | Request] = []
    with open(path) as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise ValueError("a request must be a JSON object")
            except ValueError as e:
                out.append(Request(id=f"line-{number}", line=number, error=f"{path}:{number}: malformed JSON line: {e}"))
                continue
            out.append(dict(obj, _line=number))
    return out


def _resolve_media(messages, base_dir: str, where: str) -> tuple[list, list[str]]:
    """Copies the messages with local media paths made absolute (relative to `base_dir`); checks they exist.

    Returns (messages, the media files as written in the request)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}} messages")
    files: list[str] = []
    resolved = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            resolved.append(message)
            continue
        blocks = []
        for block in message["content"]:
            if isinstance(block, dict) and block.get("type") in MEDIA_TYPES:
                block = dict(block)
                kind = block["type"]
                for key in (kind, "path", "url"):
                    value = block.get(key)
                    if not isinstance(value, str) or value.startswith(("http://", "https://", "data:")):
                        continue
                    name = value[len("file://"):] if value.startswith("file://") else value
                    full = os.path.normpath(os.path.join(base_dir, os.path.expanduser(name)))
                    if not os.path.exists(full):
                        raise ValueError(f"{where}: {kind} file {value!r} does not exist (looked for {full})")
                    files.append(value)
                    block[key] = full
                    break
            blocks.append(block)
        resolved.append(dict(message, content=blocks))
    return resolved, files


def _process_chat(obj: dict, ctx: Context, where: str) -> tuple[list[int], dict | None, bool]:
    """Chat messages -> (prompt ids, media processor outputs or None, holds a video)."""
    if ctx.assets is None:
        raise ValueError(f"{where}: chat messages need a checkpoint with tokenizer.json (or --tokenizer DIR); "
                         "send input_ids instead")
    from omni_jax.processing import process_messages  # noqa: PLC0415

    messages, files = _resolve_media(obj["messages"], ctx.base_dir, where)
    use_audio_in_video = obj.get("use_audio_in_video", False)
    tc = ctx.config.thinker_config
    try:
        inputs = process_messages(
            [messages], ctx.assets, use_audio_in_video=use_audio_in_video, image_settings=ctx.image_settings,
            video_settings=ctx.video_settings, n_window=tc.audio_config.n_window,
            position_id_per_seconds=float(tc.position_id_per_seconds),
        )
    except Exception as e:  # noqa: BLE001 - the processors' messages name the file; make sure of it
        message = str(e)
        if files and not any(os.path.basename(f) in message for f in files):
            message += f" (media files of this request: {', '.join(files)})"
        raise ValueError(f"{where}: {message}") from e
    ids = np.asarray(inputs["input_ids"][0])[np.asarray(inputs["attention_mask"][0]) == 1].tolist()
    media = {k: np.asarray(inputs[k]) for k in MEDIA_KEYS if k in inputs}
    return ids, (media or None), "pixel_values_videos" in inputs


def _has_assistant_header(ids: list[int], config) -> bool:
    a = np.asarray(ids)
    return bool(np.any((a[:-1] == config.im_start_token_id) & (a[1:] == config.assistant_token_id)))


def prepare_request(obj: dict, ctx: Context, where: str) -> Request:
    """Validates one request and processes its prompt and media; raises ValueError naming the cause."""
    line = obj.pop("_line")
    req = Request(id=str(obj.get("id", f"line-{line}")), line=line)
    vocab = ctx.config.text.vocab_size
    uav = obj.get("use_audio_in_video", False)
    if not isinstance(uav, bool):
        raise ValueError(f"{where}: use_audio_in_video must be true or false, got {uav!r}")
    req.use_audio_in_video = uav
    if "input_ids" in obj:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"{where}: input_ids must be a non-empty list of integers")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{where}: input_ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        req.input_ids = ids
    elif "messages" in obj:
        req.input_ids, req.media, req.has_video = _process_chat(obj, ctx, where)
    else:
        raise ValueError(f"{where}: a request needs 'input_ids' or 'messages'")

    asked = obj.get("speaker")
    if ctx.no_audio:
        return req
    if not ctx.speech:
        if asked is not None:
            raise ValueError(f"{where}: asks for speech (speaker {asked!r}) but this checkpoint has no talker: it "
                             "writes text only; drop 'speaker' or pass --no-audio")
        return req
    from omni_jax import talker  # noqa: PLC0415

    name = ctx.default_speaker if asked is None else asked
    try:
        talker.speaker_token_id(ctx.config.talker_config, name)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not _has_assistant_header(req.input_ids, ctx.config):
        why = "speech needs a chat prompt ending in '<|im_start|>assistant'"
        if asked is not None:
            raise ValueError(f"{where}: asks for speech (speaker {asked!r}) but {why}")
        req.note = f"text only: {why}"
        return req
    req.speaker = name
    return req


def make_batches(requests: list[Request], batch_size: int) -> list[list[Request]]:
    """Groups by (speech or not, use_audio_in_video of video requests), in file order; then chunks."""
    groups: dict[tuple, list[Request]] = {}
    for r in requests:
        groups.setdefault((r.speaker is not None, r.has_video and r.use_audio_in_video), []).append(r)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def collate(batch: list[Request], pad_id: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Left-padded (B, S) ids and mask, and the batch's media: each request's arrays in row order."""
    width = max(len(r.input_ids) for r in batch)
    ids = np.full((len(batch), width), pad_id, np.int32)
    mask = np.zeros((len(batch), width), np.int32)
    for row, r in enumerate(batch):
        ids[row, width - len(r.input_ids):] = r.input_ids
        mask[row, width - len(r.input_ids):] = 1
    from omni_jax.processing.batching import concat_media  # noqa: PLC0415

    media = concat_media([r.media for r in batch if r.media])
    if "pixel_values_videos" in media:
        media["use_audio_in_video"] = batch[0].use_audio_in_video
    return ids, mask, media


# ------------------------------------------------------------------------------------------- model
def load_model(args):
    import jax  # noqa: PLC0415

    import omni_jax  # noqa: PLC0415

    from omni_jax import sharding  # noqa: PLC0415

    mesh = None
    shape = parse_mesh(args.mesh)
    if shape is not None or jax.process_count() > 1:
        # A model replica per process, on this process's own devices (jax.devices() spans every host).
        shape = shape or (1, 1, 1)
        local = jax.local_devices()
        if int(np.prod(shape)) > len(local):
            raise ValueError(f"--mesh {args.mesh}: {int(np.prod(shape))} devices, but this process has {len(local)}")
        mesh = sharding.make_mesh(*shape, devices=local[: int(np.prod(shape))])
    cache_dir = os.environ.get("OMNI_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/omni_jax/xla"))
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Cache every program: the many small ones (media buckets, talker and vocoder steps) add up at start-up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if args.ckpt:
        dtype = args.dtype or "bfloat16"
        model = omni_jax.load_pretrained(args.ckpt, dtype=dtype, skip_absent_components=args.skip_absent_components,
                                         mesh=mesh)
        what = f"checkpoint {args.ckpt}"
    else:
        name = args.preset or "tiny"
        dtype = args.dtype or "float32"
        config = omni_jax.preset(name)
        model = omni_jax.OmniModel.random(config, seed=args.seed,
                                          runtime=omni_jax.Runtime(dtype=dtype, param_dtype=dtype), mesh=mesh)
        what = (f"preset {name!r} with seeded RANDOM weights (seed {args.seed}): the output is meaningless (random "
                "tokens; the audio is noise)")
    return model, what


def load_assets(args):
    """(TextAssets or None, VisionSettings or None, VideoSettings or None) from --tokenizer or the checkpoint."""
    folder = args.tokenizer or args.ckpt
    if folder is None:
        return None, None, None
    if args.tokenizer and not os.path.exists(os.path.join(args.tokenizer, "tokenizer.json")):
        raise FileNotFoundError(f"--tokenizer {args.tokenizer!r} holds no tokenizer.json")
    assets = image = video = None
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        from omni_jax.processing import load_text_assets  # noqa: PLC0415

        assets = load_text_assets(folder)
    if os.path.exists(os.path.join(folder, "preprocessor_config.json")):
        from omni_jax.processing import VideoSettings, VisionSettings  # noqa: PLC0415

        image = VisionSettings.from_preprocessor_config(folder)
        video = VideoSettings.from_vision_settings(image)
    return assets, image, video


def has_speech(config) -> bool:
    return config.talker_config is not None and config.code2wav_config is not None and bool(config.enable_audio_output)


def check_speaker(args) -> None:
    """--speaker must name a voice of the checkpoint (from its configuration; raises otherwise)."""
    if args.speaker is None or args.no_audio:
        return
    import omni_jax  # noqa: PLC0415
    from omni_jax import talker  # noqa: PLC0415

    config = omni_jax.load_config(args.ckpt) if args.ckpt else omni_jax.preset(args.preset or "tiny")
    if not has_speech(config):
        raise ValueError(f"--speaker {args.speaker!r}: this checkpoint has no talker (a Thinking or Captioner model): "
                         "it writes text only; drop --speaker or pass --no-audio")
    talker.speaker_token_id(config.talker_config, args.speaker)


def talker_suppress_tokens(config) -> tuple[int, ...] | None:
    """None (the reference's default `[vocab - 1024, vocab)` minus EOS) unless that window reaches into the
    codebook-0 codes (talker vocabularies under 1024 + codebook size, i.e. tiny test configurations), where
    it would leave only EOS: then every non-code id `[codebook size, vocab)` except EOS."""
    tc = config.talker_config
    vocab, codes = tc.text_config.vocab_size, tc.code_predictor_config.vocab_size
    if vocab - 1024 >= codes:
        return None
    return tuple(i for i in range(codes, vocab) if i != tc.codec_eos_token_id)


def sampling_kwargs(args, ckpt: str | None) -> dict:
    """Decoding settings: command line, else the checkpoint's generation_config.json, else defaults."""
    defaults = {}
    if ckpt and os.path.exists(os.path.join(ckpt, "generation_config.json")):
        with open(os.path.join(ckpt, "generation_config.json")) as f:
            defaults = json.load(f)
    kwargs = {
        "do_sample": not args.greedy and defaults.get("do_sample", True),
        "temperature": args.temperature if args.temperature is not None else defaults.get("temperature", 1.0),
        "top_k": args.top_k if args.top_k is not None else defaults.get("top_k", 50),
        "top_p": args.top_p if args.top_p is not None else defaults.get("top_p", 1.0),
        "repetition_penalty": args.repetition_penalty if args.repetition_penalty is not None
        else defaults.get("repetition_penalty", 1.0),
    }
    return kwargs


def wav_names(requests: list[Request]) -> dict[int, str]:
    """File name per request line: the id with unsafe characters replaced; a repeated name gets its line."""
    names: dict[int, str] = {}
    used: set[str] = set()
    for r in requests:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", r.id).lstrip(".") or f"line-{r.line}"
        name = f"{base}.wav"
        if name in used:
            name = f"{base}-line{r.line}.wav"
        used.add(name)
        names[r.line] = name
    return names


def run_batch(model, batch: list[Request], args, sampling: dict, seed: int, assets, wav_name: dict[int, str]) -> dict:
    """Generates one batch (text, and speech when its requests have a speaker); returns {line: result}."""
    import soundfile  # noqa: PLC0415

    config = model.config
    eos = config.im_end_token_id
    pad = assets.pad_token_id if assets is not None and assets.pad_token_id is not None else 0
    ids, mask, media = collate(batch, pad)
    width = ids.shape[1]
    want_audio = batch[0].speaker is not None
    frames = args.max_audio_frames or (PRESET_AUDIO_FRAMES if not args.ckpt else 4095)
    start = time.perf_counter()
    stream = want_audio and args.stream
    out = model.generate(ids, mask, max_new_tokens=args.max_new_tokens, seed=seed, eos_token_id=eos,
                         return_audio=("stream" if stream else True) if want_audio else False,
                         speaker=[r.speaker for r in batch] if want_audio else "Ethan",
                         max_audio_frames=frames, stream_chunk_frames=args.chunk_frames,
                         talker_suppress_tokens=talker_suppress_tokens(config) if want_audio else None,
                         **sampling, **media)
    results = {}
    for row, r in enumerate(batch):
        n = int(out.num_generated[row])
        new = out.sequences[row, width : width + n].tolist()
        result = {"id": r.id, "prompt_tokens": len(r.input_ids), "generated_ids": new,
                  "finish_reason": "eos" if new and new[-1] == eos else "length"}
        if assets is not None:
            result["text"] = assets.tokenizer.decode(new, skip_special_tokens=True)
        if r.note:
            result["note"] = r.note
        results[r.line] = result
    if not want_audio:
        return results
    paths = [os.path.join(args.out, wav_name[r.line]) for r in batch]
    samples = [0] * len(batch)
    if stream:
        first: list[float | None] = [None] * len(batch)
        files = [soundfile.SoundFile(p, "w", samplerate=SAMPLE_RATE, channels=1, subtype="FLOAT") for p in paths]
        try:
            for chunk in out.audio_stream:
                if chunk.audio.size:
                    files[chunk.row].write(chunk.audio)
                    files[chunk.row].flush()  # readable as it grows
                    samples[chunk.row] += chunk.audio.size
                    if first[chunk.row] is None:
                        first[chunk.row] = time.perf_counter() - start
                        print(f"  {batch[chunk.row].id}: first audio packet after {first[chunk.row]:.2f}s",
                              file=sys.stderr)
        finally:
            for f in files:
                f.close()
        for row, r in enumerate(batch):
            results[r.line]["time_to_first_audio_s"] = None if first[row] is None else round(first[row], 4)
    else:
        for row, path in enumerate(paths):
            soundfile.write(path, out.audio[row], SAMPLE_RATE, subtype="FLOAT")
            samples[row] = int(out.audio[row].size)
    for row, r in enumerate(batch):
        results[r.line].update(audio=wav_name[r.line], sample_rate=SAMPLE_RATE, audio_samples=samples[row],
                               speaker=r.speaker)
        if samples[row] == 0:
            results[r.line]["note"] = "the talker ended at once (codec EOS first): the wav is empty"
    return results


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.chunk_frames < 1 or (
            args.max_audio_frames is not None and args.max_audio_frames < 1):
        print("error: --batch-size, --max-new-tokens, --chunk-frames and --max-audio-frames must be >= 1",
              file=sys.stderr)
        return 2
    from omni_jax import distributed  # noqa: PLC0415

    try:
        parse_mesh(args.mesh)
        distributed.initialize_from_args(args)  # before anything touches a JAX device
    except Exception as e:  # noqa: BLE001 - report any start-up failure plainly
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax  # noqa: PLC0415

    rank, ranks = jax.process_index(), jax.process_count()
    try:
        raw_requests = read_requests(args.requests)
        if ranks > 1:
            raw_requests = distributed.process_share(raw_requests)
        check_speaker(args)  # these two before the (slow) model load
        assets, image_settings, video_settings = load_assets(args)
        model, what = load_model(args)
        speech_ok = has_speech(model.config)
    except Exception as e:  # noqa: BLE001 - report any start-up failure plainly
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"omni_jax infer: {what}" + (f"; {distributed.describe()}, {len(raw_requests)} requests here"
                                       if ranks > 1 else ""), file=sys.stderr)
    if not args.no_audio and not speech_ok:
        print("note: this checkpoint has no talker/Code2Wav (Thinking or Captioner): writing text only",
              file=sys.stderr)

    ctx = Context(
        config=model.config, assets=assets,
        base_dir=os.path.dirname(os.path.abspath(args.requests)) if args.requests else os.getcwd(),
        speech=speech_ok and not args.no_audio, default_speaker=args.speaker or "Ethan",
        no_audio=args.no_audio,
        image_settings=image_settings, video_settings=video_settings,
    )
    context = model.config.text.max_position_embeddings
    requests: list[Request] = []
    results: dict[int, dict] = {}
    for obj in raw_requests:
        if isinstance(obj, Request):
            results[obj.line] = {"id": obj.id, "error": obj.error}
            continue
        line = obj["_line"]
        where = f"{args.requests or '<built-in>'}:{line}"
        try:
            req = prepare_request(obj, ctx, where)
            if len(req.input_ids) + args.max_new_tokens > context:
                raise ValueError(
                    f"{where}: prompt of {len(req.input_ids)} tokens + {args.max_new_tokens} new tokens exceeds the "
                    f"model's context of {context}"
                )
            requests.append(req)
        except Exception as e:  # noqa: BLE001 - one bad request must not lose the others
            results[line] = {"id": str(obj.get("id", f"line-{line}")), "error": str(e)}

    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.jsonl")
    sampling = sampling_kwargs(args, args.ckpt)
    names = wav_names(requests)

    from tqdm import tqdm  # noqa: PLC0415

    start = time.perf_counter()
    batches = make_batches(requests, args.batch_size)
    with tqdm(total=len(requests), unit="req", desc="generating", file=sys.stderr) as bar:
        for number, batch in enumerate(batches):
            seed = args.seed + (number * ranks + rank) * args.batch_size
            try:
                results.update(run_batch(model, batch, args, sampling, seed, assets, names))
            except Exception as e:  # noqa: BLE001 - retry alone so that one failing request costs only itself
                for r in batch:
                    try:
                        if len(batch) == 1:
                            raise e
                        results.update(run_batch(model, [r], args, sampling, seed, assets, names))
                    except Exception as single:  # noqa: BLE001
                        results[r.line] = {"id": r.id, "error": f"generation failed: {single}"}
                        wav = os.path.join(args.out, names[r.line])
                        if os.path.exists(wav):
                            os.remove(wav)
            bar.update(len(batch))
    elapsed = time.perf_counter() - start
    if ranks > 1:
        # Every process's results to every process; process 0 alone writes them.
        for result in results.values():
            result["process"] = rank
        gathered = distributed.allgather_objects(
            {"results": [[line, r] for line, r in results.items()], "elapsed": elapsed})
        results = {line: r for part in gathered for line, r in part["results"]}
        elapsed = max(part["elapsed"] for part in gathered)
    if rank == 0:
        with open(results_path, "w") as f:
            for line in sorted(results):
                f.write(json.dumps(results[line]) + "\n")
    failed = sum(1 for r in results.values() if "error" in r)
    tokens = sum(len(r.get("generated_ids", ())) for r in results.values())
    audio_s = sum(r.get("audio_samples", 0) for r in results.values()) / SAMPLE_RATE
    print(
        (f"wrote {len(results)} results ({failed} failed) to {results_path}" if rank == 0 else
         f"process {rank}: served its requests; process 0 wrote {len(results)} results ({failed} failed)")
        + f"; {tokens} tokens"
        + (f" and {audio_s:.2f}s of audio" if audio_s else "") + f" in {elapsed:.1f}s (compilation included)",
        file=sys.stderr,
    )
    for r in sorted(results.values(), key=lambda r: r["id"]):
        if "error" in r:
            print(f"  {r['id']}: {r['error']}", file=sys.stderr)
        elif "time_to_first_audio_s" in r:
            print(f"  {r['id']}: first audio after {r['time_to_first_audio_s']}s", file=sys.stderr)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
