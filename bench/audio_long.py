"""AuT audio encoder on CPU: 40 minutes of audio (time, peak memory), and omni_jax vs the PyTorch
reference audio tower side by side on the same small random model (30 s and 5 min clips).

    python bench/audio_long.py [--minutes 40] [--repeats 5] [--threads N] [--skip-reference] [--json OUT]

Small model: d_model 256, 4 layers, 4 heads, FFN 1024, conv channels 64, 128 mel bins, output 512,
n_window 50, n_window_infer 800 (the published windowing: 104-token attention windows).
Features are random log-mel-like frames at 100 frames/s. fp32 on both sides.

Each side runs in its own process, so that neither runtime's worker threads (torch's OpenMP pool
spins after every op) steal cores from the other:

* omni_jax runs in a subprocess that never imports torch; its `ru_maxrss` is the encoder's own
  peak (the whole process: Python/JAX runtime, params, host features; the level before encoding is
  printed too). "first call" includes compilation; the timed calls reuse the compiled program.
* The reference runs `Qwen3OmniMoeAudioEncoder` with its default attention (SDPA, one call per
  window) under `torch.no_grad()` in the parent process, which also draws the weights
  (`convert.reference.randomize_`), hands them to the subprocess, and checks that both outputs agree.

Timings are the best of `--repeats` after a warm-up (the machine may be shared; the best run is
the least disturbed one).
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


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def omni_jax_side(workdir: str, minutes: float, repeats: int) -> dict:
    """Subprocess body (no torch): the side-by-side clips with the parent's weights, then the long audio."""
    import jax
    import numpy as np

    from omni_jax import audio_encoder as ae
    from omni_jax.config import Runtime
    from omni_jax.nn.params import init_params, unflatten

    cfg = small_audio_config()
    rt = Runtime(dtype="float32", param_dtype="float32")
    out: dict = {"clips": []}
    weights = os.path.join(workdir, "params.npz")
    if os.path.exists(weights):
        with np.load(weights) as z:
            params = jax.device_put(unflatten({k: z[k] for k in z.files}))
        for seconds in CLIPS_S:
            frames = seconds * 100
            feats = _features(frames, seed=1)

            def run():
                emb, _ = ae.encode(params, feats, [frames], cfg, rt)
                return emb.block_until_ready()

            t0 = time.perf_counter()
            np.save(os.path.join(workdir, f"ours_{seconds}.npy"), np.asarray(run()))
            first = time.perf_counter() - t0
            out["clips"].append({"seconds": seconds, "first_call_s": first, "best_s": _best_of(run, repeats)})

    # Long audio, fresh random weights (the numbers do not matter, the shapes do).
    params = init_params(ae.audio_encoder_specs(cfg), jax.random.PRNGKey(0), dtype=np.float32)
    frames = int(round(minutes * 60 * 100))
    feats = _features(frames, seed=2)
    baseline = _maxrss_mib()

    def run_long():
        emb, counts = ae.encode(params, feats, [frames], cfg, rt)
        emb.block_until_ready()
        return emb, counts

    t0 = time.perf_counter()
    emb, counts = run_long()
    first = time.perf_counter() - t0
    best = _best_of(run_long, max(1, repeats // 2))
    assert np.isfinite(np.asarray(emb)).all()
    plan = ae.plan_audio(feats, [frames], cfg)
    out["long"] = {
        "minutes": minutes,
        "frames": frames,
        "tokens": int(counts.sum()),
        "attention_rows_x_width": list(plan.segment_ids.shape),
        "chunks_padded": int(plan.chunks_cmf.shape[0]),
        "first_call_s": first,
        "best_s": best,
        "baseline_maxrss_mib": baseline,
        "peak_maxrss_mib": _maxrss_mib(),
        "features_mib": feats.nbytes / 2**20,
    }
    return out


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


def reference_side(ref, workdir: str, repeats: int) -> list[dict]:
    import numpy as np
    import torch

    rows = []
    for seconds in CLIPS_S:
        frames = seconds * 100
        feats = torch.tensor(_features(frames, seed=1))
        lens = torch.tensor([frames])

        def run():
            with torch.no_grad():
                return ref(feats, feature_lens=lens).last_hidden_state

        expected = run().numpy()
        best = _best_of(run, repeats)
        ours = np.load(os.path.join(workdir, f"ours_{seconds}.npy"))
        same_shape = ours.shape == expected.shape
        err = float(np.abs(ours - expected).max() / np.abs(expected).max()) if same_shape else float("inf")
        rows.append({"seconds": seconds, "tokens": int(expected.shape[0]), "reference_s": best, "max_rel_diff": err})
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
        print(json.dumps(omni_jax_side(args.omni_jax_side, args.minutes, args.repeats)))
        return 0

    with tempfile.TemporaryDirectory() as workdir:
        ref = None if args.skip_reference else _reference_and_weights(workdir, args.threads)
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--omni-jax-side", workdir, "--minutes", str(args.minutes),
             "--repeats", str(args.repeats)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        ours = json.loads(proc.stdout.strip().splitlines()[-1])
        rows = [] if ref is None else reference_side(ref, workdir, args.repeats)

    import jax

    long = ours["long"]
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
        for row, mine in zip(rows, ours["clips"]):
            row.update(omni_jax_s=mine["best_s"], omni_jax_first_call_s=mine["first_call_s"],
                       speedup=row["reference_s"] / mine["best_s"])
        results["side_by_side"] = rows
        print(f"\n## omni_jax vs reference (same weights; best of {args.repeats}; torch threads {args.threads})\n")
        print("| clip | tokens | reference s | omni_jax s | speed-up | omni_jax first call s | max rel diff |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['seconds']} s | {r['tokens']} | {r['reference_s']:.3f} | {r['omni_jax_s']:.3f} | "
                  f"{r['speedup']:.1f}x | {r['omni_jax_first_call_s']:.2f} | {r['max_rel_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
