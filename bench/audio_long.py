"""AuT audio encoder on CPU: 40 minutes of audio (time, peak memory), and omni_jax vs the PyTorch
reference audio tower side by side on the same small random model (30 s and 5 min clips).

    python bench/audio_long.py [--minutes 40] [--repeats 5] [--threads N] [--skip-reference] [--json OUT]

Small model: d_model 256, 4 layers, 4 heads, FFN 1024, conv channels 64, 128 mel bins, output 512,
n_window 50, n_window_infer 800 (the published windowing: 104-token attention windows).
Features are random log-mel-like frames at 100 frames/s. fp32 on both sides.

Each side runs in its own process, so that neither runtime's worker threads (torch's OpenMP pool
spins after every op) steal cores from the other:

* omni_jax runs in a subprocess that never imports torch. It first encodes the long audio; its
  `ru_maxrss` is then the encoder's own peak (the whole process: Python/JAX runtime, params, host
  features; the level before encoding is printed too). "first call" includes compilation.
* The reference runs `Qwen3OmniMoeAudioEncoder` with its default attention (SDPA, one call per
  window) under `torch.no_grad()` in the parent process, which also draws the weights
  (`convert.reference.randomize_`), hands them to the subprocess, and checks that both outputs agree.
* Clip timings are taken in pairs, the two processes taking turns (one call each, a short pause
  between), so both sides see the same machine load; the table gives each side's best call and the
  median of the per-pair ratios. Compilation and a warm-up call are excluded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLIPS_S = (30, 300)
PAUSE_S = 0.5  # lets the other runtime's worker threads go idle before a timed call


def small_audio_config():
    from omni_jax.config import AudioEncoderConfig

    return AudioEncoderConfig(
        num_mel_bins=128, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024, d_model=256,
        output_dim=512, downsample_hidden_size=64, n_window=50, n_window_infer=800,
    )


def _features(frames: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.standard_normal((128, frames), dtype=np.float32) * 0.5 - 0.5).astype(np.float32)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _say(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def omni_jax_side(workdir: str, minutes: float, repeats: int) -> None:
    """Subprocess body (no torch). Writes JSON lines: the long-audio result, then one line per clip
    once compiled; then answers each "<seconds>" line on stdin with one timed call."""
    import jax
    import numpy as np

    from omni_jax import audio_encoder as ae
    from omni_jax.config import Runtime
    from omni_jax.nn.params import init_params, unflatten

    cfg = small_audio_config()
    rt = Runtime(dtype="float32", param_dtype="float32")

    # Long audio first (so the memory baseline is the bare runtime), fresh random weights.
    params = init_params(ae.audio_encoder_specs(cfg), jax.random.PRNGKey(0), dtype=np.float32)
    frames = int(round(minutes * 60 * 100))
    feats = _features(frames, seed=2)
    plan = ae.plan_audio(feats, [frames], cfg)
    baseline = _maxrss_mib()

    def run_long():
        emb, _ = ae.encode(params, feats, [frames], cfg, rt)
        return emb.block_until_ready()

    first = _timed(run_long)
    best = min(_timed(run_long) for _ in range(max(1, repeats // 2)))
    _say({"long": {
        "minutes": minutes, "frames": frames, "tokens": plan.num_tokens,
        "attention_rows_x_width": list(plan.segment_ids.shape), "chunks_padded": int(plan.chunks_cmf.shape[0]),
        "first_call_s": first, "best_s": best, "baseline_maxrss_mib": baseline, "peak_maxrss_mib": _maxrss_mib(),
        "features_mib": feats.nbytes / 2**20,
    }})
    del feats, plan

    weights = os.path.join(workdir, "params.npz")
    if not os.path.exists(weights):
        return
    with np.load(weights) as z:
        params = jax.device_put(unflatten({k: z[k] for k in z.files}))
    runs = {}
    for seconds in CLIPS_S:
        clip = _features(seconds * 100, seed=1)

        def run(clip=clip):
            emb, _ = ae.encode(params, clip, [clip.shape[1]], cfg, rt)
            return emb.block_until_ready()

        t0 = time.perf_counter()
        np.save(os.path.join(workdir, f"ours_{seconds}.npy"), np.asarray(run()))
        first = time.perf_counter() - t0
        run()  # warm-up
        runs[seconds] = run
        _say({"ready": seconds, "first_call_s": first})
    for line in sys.stdin:
        if line.strip() == "quit":
            return
        _say({"t": _timed(runs[int(line)])})


def _reference_and_weights(workdir: str, threads: int):
    """The reference tower with re-drawn weights; the same weights saved for the subprocess."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from convert.hf_to_jax import convert_tensors
    from convert.reference import hf_config, randomize_
    from omni_jax import audio_encoder as ae
    from omni_jax.config import preset
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    cfg = small_audio_config()
    omni = preset("tiny")
    omni = omni.replace(thinker_config=dataclasses.replace(omni.thinker_config, audio_config=cfg))
    torch.manual_seed(0)
    ref = modeling.Qwen3OmniMoeAudioEncoder(hf_config(omni).thinker_config.audio_config).eval().float()
    randomize_(ref, seed=0)
    tensors = [(f"thinker.audio_tower.{k}", (lambda t=t: t.detach().numpy()), tuple(t.shape))
               for k, t in ref.state_dict().items()]
    flat = convert_tensors(tensors, {"thinker": {"audio_tower": ae.audio_encoder_specs(cfg)}}, dtype="float32")
    prefix = "thinker/audio_tower/"
    np.savez(os.path.join(workdir, "params.npz"), **{k[len(prefix):]: np.asarray(v) for k, v in flat.items()})
    return ref


def _side_by_side(ref, child, workdir: str, ready: dict, repeats: int) -> list[dict]:
    import numpy as np
    import torch

    rows = []
    for seconds in CLIPS_S:
        feats = torch.tensor(_features(seconds * 100, seed=1))
        lens = torch.tensor([seconds * 100])

        def run_ref():
            with torch.no_grad():
                return ref(feats, feature_lens=lens).last_hidden_state

        expected = run_ref().numpy()  # also the warm-up
        ours = np.load(os.path.join(workdir, f"ours_{seconds}.npy"))
        same_shape = ours.shape == expected.shape
        err = float(np.abs(ours - expected).max() / np.abs(expected).max()) if same_shape else float("inf")
        t_ref, t_ours = [], []
        for _ in range(repeats):
            time.sleep(PAUSE_S)
            t_ref.append(_timed(run_ref))
            time.sleep(PAUSE_S)
            child.stdin.write(f"{seconds}\n")
            child.stdin.flush()
            t_ours.append(json.loads(child.stdout.readline())["t"])
        ratios = [a / b for a, b in zip(t_ref, t_ours)]
        rows.append({
            "seconds": seconds, "tokens": int(expected.shape[0]), "reference_s": min(t_ref), "omni_jax_s": min(t_ours),
            "speedup_of_best": min(t_ref) / min(t_ours), "speedup_median_pair": float(np.median(ratios)),
            "omni_jax_first_call_s": ready[seconds], "max_rel_diff": err,
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--omni-jax-side", metavar="WORKDIR", help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()

    if args.omni_jax_side:
        omni_jax_side(args.omni_jax_side, args.minutes, args.repeats)
        return 0

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        ref = None if args.skip_reference else _reference_and_weights(workdir, args.threads)
        child = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--omni-jax-side", workdir, "--minutes", str(args.minutes),
             "--repeats", str(args.repeats)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            line = child.stdout.readline()
            if not line:
                return child.wait() or 1
            long = json.loads(line)["long"]
            if ref is not None:
                ready = {}
                for _ in CLIPS_S:
                    msg = json.loads(child.stdout.readline())
                    ready[msg["ready"]] = msg["first_call_s"]
                rows = _side_by_side(ref, child, workdir, ready, args.repeats)
            child.stdin.write("quit\n")
            child.stdin.flush()
        finally:
            child.stdin.close()
            if child.wait(timeout=60):
                return child.returncode

    import jax

    print(f"# AuT audio encoder, CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}), "
          f"JAX {jax.__version__}, fp32\n# {small_audio_config()}")
    print(f"\n## {long['minutes']:g} minutes of audio, one clip ({long['frames']} frames -> {long['tokens']} tokens; "
          f"{long['chunks_padded']} chunk slots; attention over {long['attention_rows_x_width'][0]} rows x "
          f"{long['attention_rows_x_width'][1]} slots)\n")
    print(f"first call (compile + run): {long['first_call_s']:.2f} s; best later call: {long['best_s']:.2f} s")
    print(f"peak RSS: {long['peak_maxrss_mib']:.0f} MiB (before encoding: {long['baseline_maxrss_mib']:.0f} MiB; "
          f"host features {long['features_mib']:.0f} MiB)")
    results = {"long": long}
    if rows:
        results["side_by_side"] = rows
        print(f"\n## omni_jax vs reference (same weights; {args.repeats} alternating pairs; torch threads "
              f"{args.threads})\n")
        print("| clip | tokens | reference best s | omni_jax best s | speed-up (best) | speed-up (median pair) "
              "| omni_jax first call s | max rel diff |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['seconds']} s | {r['tokens']} | {r['reference_s']:.3f} | {r['omni_jax_s']:.3f} | "
                  f"{r['speedup_of_best']:.1f}x | {r['speedup_median_pair']:.1f}x | {r['omni_jax_first_call_s']:.2f} | "
                  f"{r['max_rel_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
