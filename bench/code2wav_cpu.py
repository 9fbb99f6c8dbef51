"""Code2Wav on CPU: the PyTorch reference and omni_jax side by side, same random vocoder.

    python bench/code2wav_cpu.py [--config small|full] [--seconds 10] [--batch 1] [--threads N] [--repeats 3]

--threads sets torch's threads; --threads 1 also passes `--xla_cpu_multi_thread_eigen=false` to XLA,
which no longer keeps XLA:CPU on one core (its thunk runtime still used 2 CPU-seconds per wall-second
on the decode, measured 2026-11-22), so --threads 1 rows are not a one-core-each comparison.

Configs: "small" (default): hidden 256, 4 layers, 8 heads, MLP 768, decoder_dim 384 (channels
384 -> 192 -> 96 -> 48 -> 24), 16 quantizers x 2048 codes, the published rates (1920 samples per
frame); "full": the published vocoder (216M parameters). Work: `--seconds` of codes (12.5 frames/s).

Measured, best of `--repeats` after a warm-up (omni_jax compile time is printed separately):
  * full decode   : reference `forward` vs `code2wav.decode_bucketed`
  * chunked decode: reference `chunked_decode(300, 25)` vs `code2wav.chunked_decode`
  * streaming     : `StreamingDecoder` fed 25-frame chunks (2 s), seamless (no reference equivalent;
                    compared with the reference's chunked decode at chunk 25, context 25, which
                    recomputes everything per chunk)
Prints seconds, the real-time factor (audio seconds / compute seconds) and the speed ratio ours/ref.

Recorded 2026-11-22 on the 2-core shared CPU box (AMD EPYC, AVX2), small config, 10 s (125 frames,
decoded as 128), default threads (2), best of 3; each run started after the CPUs had been idle (< 2%
busy) for 5 s, under flock (load averages 0.77 -> 1.12 and 1.03 -> 1.14 include earlier runs):

  | work | reference s | omni_jax s | speed-up |
  |---|---|---|---|
  | full decode | 0.675 / 0.817 | 0.317 / 0.340 | 2.13x / 2.40x |
  | chunked_decode(300, 25) | 0.611 / 0.807 | 0.320 / 0.316 | 1.91x / 2.56x |
  | stream, 25-frame chunks | 1.013 / 1.086 | 0.401 / 0.407 | 2.53x / 2.67x |

  max |ours - ref| / max |ref| 1.3e-6; first decode (compile + run) 2.3-2.6 s. Runs of the code before
  the 2026-11-22 vocoder work (commit 564dbf4) in the same conditions, alternating with a run of the
  then-current code: full decode 0.365 / 0.369 s, chunked 0.373 / 0.378 s, stream 0.446 / 0.449 s
  (reference 0.59-0.85 s). The reference varies +-20% between runs even on an idle machine; ours +-5%.

  Where omni_jax's time goes (112 frames, 275 ms): the decoder's dense convolutions, 33 GFLOP run at
  150-180 GFLOP/s in isolation (2 threads; torch's 2048^3 fp32 matmul here: ~150), i.e. near the FMA
  peak, about 70%; the rest is SnakeBeta (one fused loop per activation), residual adds, the weight
  relayouts XLA inserts before each convolution, ~20k page faults for the 82 MB of per-call
  temporaries, the pre-transformer and the upsampling stages. Per change (alternating A/B in one
  process, min of 9-15 decodes of 112 frames): transposed convs in polyphase form + the last conv as a
  matmul 332 -> 315 ms (loaded machine); convs with <= 64 channels in the 2-D (1, T) form 288 -> 274
  ms; speech's 100 frames now pad to 104 instead of 112 (298 -> 282 ms; unpadded: 266 ms).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_config(name: str):
    from omni_jax.config import Code2WavConfig

    if name == "full":
        return Code2WavConfig()
    return Code2WavConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, intermediate_size=768,
                          num_hidden_layers=4, decoder_dim=384)


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="small", choices=["small", "full"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream-chunk", type=int, default=25)
    args = parser.parse_args()
    if args.threads == 1:  # one core each: steadier figures on a shared machine
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"

    import jax
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from convert.hf_to_jax import convert_tensors
    from convert.reference import randomize_, state_dict_tensors
    from omni_jax import code2wav as c2w
    from omni_jax.config import Runtime
    from omni_jax.nn.params import unflatten
    from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as hf_configuration
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    cfg = bench_config(args.config)
    hf_cfg = hf_configuration.Qwen3OmniMoeCode2WavConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ref = modeling.Qwen3OmniMoeCode2Wav(hf_cfg).eval().float()
    randomize_(ref, 0, std=0.02)
    rt = Runtime(dtype="float32", param_dtype="float32")
    tensors = (("code2wav." + k, load, shape) for k, load, shape in state_dict_tensors(ref))
    params = unflatten(convert_tensors(tensors, {"code2wav": c2w.code2wav_specs(cfg)}, dtype="float32"))
    params = jax.device_put(params["code2wav"])

    frames = int(round(args.seconds * 12.5))
    codes = np.random.default_rng(0).integers(0, cfg.codebook_size, (args.batch, cfg.num_quantizers, frames))
    codes_t = torch.tensor(codes)
    audio_s = args.batch * c2w.output_length(cfg, frames) / 24000

    print(f"config {args.config}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, decoder_dim "
          f"{cfg.decoder_dim}; {frames} frames x batch {args.batch} = {audio_s:.1f} s of audio; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__} "
          f"({jax.devices()[0].platform}), {os.cpu_count()} CPUs")

    t0 = time.perf_counter()
    ours_full = c2w.decode_bucketed(params, codes, cfg, rt)
    print(f"omni_jax first full decode (compile + run): {time.perf_counter() - t0:.1f} s")
    with torch.no_grad():
        ref_full = ref(codes_t).numpy()[:, 0]
    err = np.abs(ours_full - ref_full).max() / np.abs(ref_full).max()
    print(f"max |ours - ref| / max |ref| (full decode): {err:.1e}")

    rows = []
    with torch.no_grad():
        rows.append(("full decode", _best(lambda: ref(codes_t), args.repeats),
                     _best(lambda: c2w.decode_bucketed(params, codes, cfg, rt), args.repeats)))
        rows.append(("chunked_decode(300, 25)", _best(lambda: ref.chunked_decode(codes_t, 300, 25), args.repeats),
                     _best(lambda: c2w.chunked_decode(params, codes, cfg, rt), args.repeats)))
        chunk = args.stream_chunk

        def stream():
            dec = c2w.StreamingDecoder(params, cfg, rt, batch=args.batch, buckets=(chunk,))
            for start in range(0, frames, chunk):
                dec.push(codes[..., start : start + chunk])

        rows.append((f"stream, {chunk}-frame chunks (ref: chunked {chunk}/25)",
                     _best(lambda: ref.chunked_decode(codes_t, chunk, 25), args.repeats), _best(stream, args.repeats)))

    print(f"\n| work | reference s | omni_jax s | reference RTF | omni_jax RTF | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, t_ref, t_ours in rows:
        print(f"| {name} | {t_ref:.3f} | {t_ours:.3f} | {audio_s / t_ref:.1f}x | {audio_s / t_ours:.1f}x | "
              f"{t_ref / t_ours:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
