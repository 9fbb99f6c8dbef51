"""Speech at full size on one accelerator: time to first audio packet and real-time factor.

    python bench/speech_gpu.py [--preset qwen3-omni-30b-a3b-instruct] [--batch 1] [--prompt 96]
                               [--answer 32] [--frames 250] [--chunk-frames 8] [--json out.json]

What runs: `OmniModel.generate(..., return_audio=...)` on random bf16 weights of the whole model
(thinker, talker with its code predictor, Code2Wav; drawn on the device, leaf by leaf), for a chat
prompt of `--prompt` tokens per row (`<|im_start|>user ... <|im_end|> <|im_start|>assistant`).
Random weights never stop by themselves, so the work is fixed: the thinker answers exactly `--answer`
tokens (its EOS is an id no row can draw) and the talker speaks exactly `--frames` codec frames (every
non-code talker id is suppressed, the codec EOS included, as `bench/speech_cpu.py` does). Greedy.

Timed, each the median of `--repeats` calls after a warm-up call of the same shapes (the warm-up's
wall time, compiles included, is printed too):
  * thinker: `generate(return_audio=False)`: prefill + `--answer` decode steps, and with one new token
    (prefill alone), hence the time per decode step;
  * stream: `generate(return_audio="stream")`, iterated to the end. Time to first audio packet (TTFA)
    = from the call to the first chunk holding samples (thinker prefill and answer, talker prefill,
    `--chunk-frames` frames, their Code2Wav decode). Real-time factor (RTF) = audio seconds per row /
    wall seconds of the speech part (stream end minus thinker end), and the same over the whole call;
  * offline: `generate(return_audio=True)` (the reference's chunked Code2Wav decode of all frames).
Peak device memory is `device.memory_stats()["peak_bytes_in_use"]` where the backend reports it.

Recorded results are in bench/RESULTS.md ("Speech at full size on a GPU").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SAMPLE_RATE = 24_000


def random_params_on_device(specs: dict, seed: int, dtype):
    """Random parameters drawn on the default device, one leaf at a time (bf16 draws, std of the
    spec): at full size (35 B parameters) a host draw takes minutes and an fp32 draw of the largest
    leaf doubles its memory."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from omni_jax.nn.params import flatten, hash_path, unflatten

    key = jax.random.key(seed)
    out = {}
    for path, spec in flatten(specs).items():
        if spec.init == "normal":
            leaf_key = jax.random.fold_in(key, np.uint32(hash_path(path)))
            out[path] = jax.random.normal(leaf_key, spec.shape, dtype) * jnp.asarray(spec.std, dtype)
        elif spec.init in ("ones", "zeros", "constant"):
            value = {"ones": 1.0, "zeros": 0.0}.get(spec.init, spec.value)
            out[path] = jnp.full(spec.shape, value, dtype)
        else:
            raise ValueError(f"unknown initialiser {spec.init!r} for {path}")
    jax.block_until_ready(out)
    return unflatten(out)


def chat_prompts(config, batch: int, length: int, seed: int = 0):
    """(B, length) int64 chat prompts of random text tokens; row r is left-padded by 4*r tokens so that
    rows differ in length."""
    import numpy as np

    newline = 198
    rng = np.random.default_rng(seed)
    # Ordinary text ids lie below the special ids, which start just under <|im_start|>.
    text_ids_end = min(config.text.vocab_size, config.im_start_token_id) - 32
    pad_id = config.text.pad_token_id if config.text.pad_token_id is not None else config.im_end_token_id
    ids = np.full((batch, length), pad_id, np.int64)
    mask = np.zeros((batch, length), np.int64)
    for r in range(batch):
        body = min(length - 8 - 4 * r, length - 8)
        if body < 1:
            raise ValueError(f"--prompt {length} is too short for {batch} rows of different lengths")
        row = ([config.im_start_token_id, config.user_token_id, newline]
               + [int(t) for t in rng.integers(16, text_ids_end, body)]
               + [config.im_end_token_id, newline, config.im_start_token_id, config.assistant_token_id, newline])
        ids[r, length - len(row):] = row
        mask[r, length - len(row):] = 1
    return ids, mask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen3-omni-30b-a3b-instruct")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=96, help="prompt tokens per row (chat template included)")
    parser.add_argument("--answer", type=int, default=32, help="thinker tokens generated per row")
    parser.add_argument("--frames", type=int, default=250, help="codec frames per row (12.5 per audio second)")
    parser.add_argument("--chunk-frames", type=int, default=8, help="codec frames per streamed packet")
    parser.add_argument("--attention-impl", default="auto")
    parser.add_argument("--grouped-matmul-impl", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import jax
    import numpy as np

    from omni_jax.config import Runtime, preset
    from omni_jax.model import OmniModel, model_specs

    config = preset(args.preset)
    rt = Runtime(attention_impl=args.attention_impl, grouped_matmul_impl=args.grouped_matmul_impl)
    device = jax.devices()[0]
    result = {"device": getattr(device, "device_kind", str(device)), "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "batch": args.batch,
              "prompt": args.prompt, "answer": args.answer, "frames": args.frames,
              "chunk_frames": args.chunk_frames, "runtime": {"attention_impl": rt.attention_impl,
                                                             "grouped_matmul_impl": rt.grouped_matmul_impl}}
    print(f"device {result['device']}, jax {jax.__version__}, preset {args.preset}", flush=True)

    t0 = time.perf_counter()
    specs = model_specs(config)
    params = random_params_on_device(specs, seed=0, dtype=jax.numpy.bfloat16)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    result["params_b"] = n_params / 1e9
    result["init_s"] = time.perf_counter() - t0
    print(f"{n_params / 1e9:.2f} B parameters drawn in {result['init_s']:.1f} s", flush=True)
    model = OmniModel(config, params, rt)

    ids, mask = chat_prompts(config, args.batch, args.prompt)
    eos_never = [config.text.vocab_size + 7]  # an id outside the vocabulary: the answer has --answer tokens
    tc = config.talker_config
    suppress = list(range(tc.code_predictor_config.vocab_size, tc.text_config.vocab_size))
    common = dict(max_new_tokens=args.answer, eos_token_id=eos_never, max_audio_frames=args.frames,
                  talker_suppress_tokens=suppress, speaker=sorted(dict(tc.speaker_id))[0])

    def thinker_only(new_tokens=args.answer):
        t = time.perf_counter()
        out = model.generate(ids, mask, **{**common, "max_new_tokens": new_tokens})
        return time.perf_counter() - t, out

    def stream():
        t = time.perf_counter()
        out = model.generate(ids, mask, return_audio="stream", stream_chunk_frames=args.chunk_frames, **common)
        t_text = time.perf_counter() - t
        first, samples = None, np.zeros(args.batch, np.int64)
        for chunk in out.audio_stream:
            if first is None and chunk.audio.size:
                first = time.perf_counter() - t
            samples[chunk.row] += chunk.audio.shape[0]
        return dict(ttfa_s=first, text_s=t_text, total_s=time.perf_counter() - t, samples=samples.tolist())

    def offline():
        t = time.perf_counter()
        out = model.generate(ids, mask, return_audio=True, **common)
        return time.perf_counter() - t, [a.shape[0] for a in out.audio]

    def peak_gib():
        stats = device.memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**30

    warm, _ = thinker_only()
    thinker_only(1)
    # Median of --repeats: the first timed calls on a fresh GPU process ran up to 4x slower.
    thinker_s = statistics.median(thinker_only()[0] for _ in range(args.repeats))
    prefill_s = statistics.median(thinker_only(1)[0] for _ in range(args.repeats))
    decode_ms = 1e3 * (thinker_s - prefill_s) / max(args.answer - 1, 1)
    result["thinker"] = {"warmup_s": warm, "s": thinker_s, "prefill_s": prefill_s, "decode_ms_per_step": decode_ms,
                         "answer_tok_per_s": args.batch * args.answer / thinker_s}
    print(f"thinker: warm-up {warm:.1f} s; prefill {args.batch}x{args.prompt} + {args.answer} tokens: "
          f"{thinker_s:.3f} s (prefill + 1 token {prefill_s:.3f} s; {decode_ms:.1f} ms per decode step)", flush=True)

    t = time.perf_counter()
    stream()
    warm_stream = time.perf_counter() - t
    runs = sorted((stream() for _ in range(args.repeats)), key=lambda r: r["total_s"])
    s = runs[len(runs) // 2]
    audio_s = max(s["samples"]) / SAMPLE_RATE
    speech_s = s["total_s"] - s["text_s"]
    result["stream"] = {**s, "warmup_s": warm_stream, "audio_s_per_row": audio_s, "speech_s": speech_s,
                        "rtf_speech": audio_s / speech_s, "rtf_total": audio_s / s["total_s"],
                        "frames_per_s": args.batch * args.frames / speech_s}
    print(f"stream: warm-up {warm_stream:.1f} s; TTFA {s['ttfa_s']:.3f} s (text {s['text_s']:.3f} s); "
          f"{audio_s:.2f} s of audio per row in {speech_s:.3f} s of speech work: RTF {audio_s / speech_s:.1f}x "
          f"({result['stream']['frames_per_s']:.1f} frames/s over {args.batch} rows); whole call "
          f"{s['total_s']:.3f} s, RTF {audio_s / s['total_s']:.1f}x", flush=True)

    if not args.skip_offline:
        offline()
        timed = sorted(offline() for _ in range(args.repeats))
        off_s, lengths = timed[len(timed) // 2]
        off_audio = max(lengths) / SAMPLE_RATE
        result["offline"] = {"s": off_s, "speech_s": off_s - thinker_s, "audio_s_per_row": off_audio,
                             "rtf_speech": off_audio / (off_s - thinker_s), "rtf_total": off_audio / off_s}
        print(f"offline (chunked decode): {off_s:.3f} s whole call, speech part {off_s - thinker_s:.3f} s, "
              f"RTF {result['offline']['rtf_speech']:.1f}x (whole call {result['offline']['rtf_total']:.1f}x)",
              flush=True)

    result["peak_device_gib"] = peak_gib()
    print(f"peak device memory {result['peak_device_gib']:.1f} GiB", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
