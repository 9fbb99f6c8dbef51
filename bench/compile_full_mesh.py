"""Full-size plan checked by the compiler: the Qwen3-Omni-30B-A3B thinker on simulated large meshes.

    python bench/compile_full_mesh.py --all-variants        # the recorded set (bench/RESULTS_scaleout.md)
    python bench/compile_full_mesh.py                       # every default mesh, prefill + train step
    python bench/compile_full_mesh.py --meshes 8x8x1:fsdp,64x1x1:fsdp --what train --slice-expert-layers
    python bench/compile_full_mesh.py --table-from bench/scaleout_results.jsonl

Lowers and compiles, with abstract inputs only (`jax.ShapeDtypeStruct`s carrying their shardings; no
weight is ever allocated), on `--devices` simulated CPU devices (`--xla_force_host_platform_device_count`,
set before JAX is imported):

  * prefill: the thinker text decoder over a (batch, seq) prompt filling a KV cache of seq + 512
    positions and returning the last position's logits, bf16 parameters and compute (inference);
  * train: one optimizer step, next-token cross-entropy (fp32 log-softmax over the full vocabulary) +
    the MoE load-balancing loss (coefficient 0.001; its top-k per batch shard in a `shard_map`),
    `jax.grad`, `optax.adamw` update; fp32 master weights and Adam moments, bf16 compute
    (`Runtime(param_dtype="float32", dtype="bfloat16")`), remat "full" per decoder layer, parameters and
    optimizer state donated. A minimal step written here (not `omni_jax/training/step.py`, which was
    being written at the same time), text tokens only.

The Pallas kernels (flash attention, grouped matmul) cannot be compiled for CPU and the CPU paths have
other memory profiles (a (S x S) score matrix per head; a tiled grouped matmul whose backward stacks
one weight gradient per row tile), so by default both are replaced, in this process only, by stand-ins
with the kernels' memory profile (`blockwise_attention`, `standin_grouped_matmul`); --attention xla
--grouped-matmul tiled compiles the CPU paths as written. --slice-expert-layers applies, in this process
only, the fix proposed for the expert-parallel MoE (index the layer's expert matrices before the
`shard_map`): as written, the whole (L, E, D, F) expert stacks enter the `shard_map`, and under FSDP
XLA all-gathers all 48 layers' experts at once.

Both run under `jax.set_mesh(mesh)`, so the model code takes its multi-device paths (activation
constraints, and the MoE's expert-parallel `shard_map` when `nn/expert_parallel.py` applies; which MoE
path was taken is recorded). Parameters: the thinker's text model (embeddings, 48 decoder layers, final
norm, lm_head), placed by `sharding.param_shardings(..., sharding.rules(fsdp))`; the audio and vision
encoders and the talker are not part of these programs (see the results file for their sizes).

Per device we report `compiled.memory_analysis()`: arguments, outputs, aliased (donated) bytes,
temporaries, and their sum `args + outputs - aliased + temps`, the buffer peak XLA planned. These are
the CPU backend's numbers: TPU/GPU compilers fuse differently (and CPU may keep fp32 copies of bf16
dots), so treat temporaries as an estimate; argument bytes are exact.

Each (mesh, program) compiles in its own subprocess (a failure or a timeout costs only that row); rows
are appended to --json as they finish and a markdown table is printed at the end. --layers N compiles an
N-layer model instead; with --extrapolate the table also gives the 48-layer figures extrapolated
linearly from two layer counts (stated as such).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PRESET = "qwen3-omni-30b-a3b-instruct"
DEFAULT_MESHES = "64x1x1:fsdp,8x8x1:fsdp,16x4x1:fsdp,8x4x2:fsdp,4x8x2:fsdp,2x8x4:fsdp,8x8x1,1x64x1"
GIB = 1024 ** 3
CACHE_EXTRA = 512  # KV-cache positions past the prompt (room to generate)


def parse_mesh(text: str) -> tuple[tuple[int, int, int], bool]:
    shape, _, opt = text.partition(":")
    dims = tuple(int(v) for v in shape.split("x"))
    if len(dims) != 3 or opt not in ("", "fsdp"):
        raise ValueError(f"mesh {text!r}: expected DATAxEXPERTxTENSOR[:fsdp], e.g. 8x8x1:fsdp")
    return dims, opt == "fsdp"


# ------------------------------------------------------------------------------------------- child
def standin_grouped_matmul(lhs, rhs, group_sizes, impl="auto"):
    """A memory stand-in for the Pallas grouped-matmul kernels (which cannot be compiled for CPU): rows sorted
    by group times their group's matrix, as a `lax.scan` over the groups with a custom VJP, so that neither
    direction keeps more than (rows x N) outputs, (rows x K) input gradients and the (G, K, N) weight
    gradient, as the kernels do. (The CPU `tiled` path's backward stacks one weight gradient per row tile,
    which no accelerator run would.) Compile-only: it does G times the work."""
    import jax
    import jax.numpy as jnp

    from omni_jax.nn.grouped_matmul import group_ids_of_rows

    rows, num_groups = lhs.shape[0], rhs.shape[0]  # static ints only: a custom_vjp must not close over tracers

    @jax.custom_vjp
    def gmm(lhs, rhs, group_sizes):
        return fwd(lhs, rhs, group_sizes)[0]

    def fwd(lhs, rhs, group_sizes):
        gid = group_ids_of_rows(group_sizes, rows)

        def body(out, g):
            y = jnp.dot(lhs, rhs[g], preferred_element_type=jnp.float32).astype(lhs.dtype)
            return jnp.where((gid == g)[:, None], y, out), None

        out, _ = jax.lax.scan(body, jnp.zeros((rows, rhs.shape[-1]), lhs.dtype), jnp.arange(num_groups))
        return out, (lhs, rhs, gid)

    def bwd(res, dy):
        lhs, rhs, gid = res

        def body(dx, g):
            dy_g = jnp.where((gid == g)[:, None], dy, 0).astype(lhs.dtype)
            dx = dx + jnp.dot(dy_g, rhs[g].T, preferred_element_type=jnp.float32).astype(lhs.dtype)
            return dx, jnp.dot(lhs.T, dy_g, preferred_element_type=jnp.float32).astype(rhs.dtype)

        dx, dw = jax.lax.scan(body, jnp.zeros_like(lhs), jnp.arange(num_groups))
        return dx, dw, None

    gmm.defvjp(fwd, bwd)
    return gmm(lhs, rhs, group_sizes)


def blockwise_attention(q, k, v, *, segment_ids=None, causal=False, window=None, scale=None, impl="auto",
                        chunk: int = 512):
    """A memory stand-in for the Pallas flash kernel, which cannot be compiled for CPU: queries in chunks of
    `chunk` (a `lax.map`), each chunk's (chunk x Sk) scores built, used and (under `jax.checkpoint`) dropped,
    so that neither the forward nor the backward holds a (Sq x Sk) score matrix. Same mask structure and
    numerics as `attention.self_attention`'s XLA path (it calls `attention.masked_attention` per chunk)."""
    import jax
    import jax.numpy as jnp

    from omni_jax.nn.attention import masked_attention

    b, sq, hq, d = q.shape
    sk = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    if sq % chunk or sq <= chunk:
        chunk = sq
    n = sq // chunk
    seg = jnp.zeros((b, sq), jnp.int32) if segment_ids is None else segment_ids
    kj = jnp.arange(sk)[None, :]

    @jax.checkpoint
    def one(args):
        start, q_c, seg_c = args
        qi = start + jnp.arange(chunk)[:, None]
        mask = jnp.ones((chunk, sk), bool)
        if causal:
            mask &= kj <= qi
        if window is not None:
            left, right = window
            if left is not None:
                mask &= kj >= qi - left
            if right is not None:
                mask &= kj <= qi + right
        mask = mask[None] & (seg_c[:, :, None] == seg[:, None, :])
        return masked_attention(q_c, k, v, mask, scale)

    q_chunks = q.reshape(b, n, chunk, hq, d).transpose(1, 0, 2, 3, 4)
    seg_chunks = seg.reshape(b, n, chunk).transpose(1, 0, 2)
    out = jax.lax.map(one, (jnp.arange(n) * chunk, q_chunks, seg_chunks))  # (n, B, chunk, Hq, D)
    return out.transpose(1, 0, 2, 3, 4).reshape(b, sq, hq, d)


def compile_one(args) -> dict:
    """Compiles one program on one mesh (in a process whose device count is already set)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from omni_jax import sharding, thinker
    from omni_jax.config import Runtime, preset
    from omni_jax.model import model_specs
    from omni_jax.nn import decoder
    from omni_jax.nn.params import abstract_params, param_count

    (data, expert, tensor), fsdp = parse_mesh(args.mesh)
    if args.attention == "blockwise":
        from omni_jax.nn import attention as attn_lib

        attn_lib.self_attention = blockwise_attention  # the decoder looks it up at call time
    gmm_impl = "auto"
    if args.grouped_matmul == "standin":
        from omni_jax.nn import grouped_matmul as gmm_lib

        gmm_lib.grouped_matmul = standin_grouped_matmul  # grouped_swiglu looks it up at call time
        gmm_impl = "ragged_dot"  # any non-"tiled" impl routes grouped_swiglu through grouped_matmul
    if args.slice_expert_layers:
        from omni_jax.nn import expert_parallel as ep_lib

        original = ep_lib.expert_parallel_moe

        def per_layer(x_td, params, *, layer=None, **kwargs):
            # Index this layer's expert matrices before shard_map: its in_specs then ask for one layer's
            # (E, D, F) gathered over FSDP's data axis, not the whole (L, E, D, F) stack.
            if layer is not None:
                experts = {k: jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)
                           for k, w in params["experts"].items()}
                params, layer = dict(params, experts=experts), None
            return original(x_td, params, layer=layer, **kwargs)

        ep_lib.expert_parallel_moe = per_layer  # moe.py calls it through the module
    config = preset(PRESET)
    tcfg = config.thinker_config
    if args.layers != tcfg.text_config.num_hidden_layers:
        import dataclasses

        text = dataclasses.replace(tcfg.text_config, num_hidden_layers=args.layers)
        tcfg = dataclasses.replace(tcfg, text_config=text)
        config = config.replace(thinker_config=tcfg)
    mesh = sharding.make_mesh(data, expert, tensor, devices=jax.devices()[: data * expert * tensor])
    specs_all = model_specs(config)["thinker"]
    specs = {"model": specs_all["model"], "lm_head": specs_all["lm_head"]}
    shardings = sharding.param_shardings(specs, mesh, sharding.rules(fsdp=fsdp))
    b, s = args.batch, args.seq
    dims = thinker.text_dims(tcfg)
    sds = jax.ShapeDtypeStruct
    batch_spec = lambda ndim, dim=0: sharding.batch_sharding(mesh, ndim, dim)  # noqa: E731
    replicated = NamedSharding(mesh, P())
    info = {"mesh": args.mesh, "program": args.program, "layers": args.layers, "batch": b, "seq": s,
            "attention": args.attention, "grouped_matmul": args.grouped_matmul, "expert_parallel": args.expert_parallel,
            "slice_expert_layers": bool(args.slice_expert_layers),
            "capacity_factor": args.capacity_factor,
            "devices": data * expert * tensor, "params": param_count(specs), "jax": jax.__version__}
    try:
        from omni_jax.nn import expert_parallel as ep

        with jax.set_mesh(mesh):
            use_ep = args.expert_parallel == "auto" and bool(ep.can_expert_parallel(tcfg.text_config.num_experts))
        info["moe_path"] = (f"expert-parallel shard_map, {ep.resolve_exchange('auto')} exchange, "
                            + ("dropless" if args.capacity_factor is None else f"capacity {args.capacity_factor}")
                            if use_ep else "grouped (XLA-partitioned)")
    except Exception as e:  # noqa: BLE001 - the module is optional (being written); record what happened
        info["moe_path"] = f"grouped (XLA-partitioned); expert_parallel unavailable: {type(e).__name__}"

    if args.program == "prefill":
        rt = Runtime(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, expert_parallel=args.expert_parallel,
                     expert_capacity_factor=args.capacity_factor, grouped_matmul_impl=gmm_impl)
        params = abstract_params(specs, jnp.bfloat16)
        params = jax.tree.map(lambda a, sh: sds(a.shape, a.dtype, sharding=sh), params, shardings)
        max_len = s + CACHE_EXTRA
        cache_abs = jax.eval_shape(lambda: decoder.init_cache(dims, b, max_len, jnp.bfloat16))
        cache_sh = jax.tree.map(lambda a: sharding.cache_sharding(mesh, a.shape), cache_abs)

        def fn(params, ids, mask, pos):
            cache = decoder.init_cache(dims, b, max_len, jnp.bfloat16)
            x = thinker.embed_tokens(params, ids, jnp.bfloat16)
            out = decoder.prefill(params["model"], x, pos, mask, dims, rt, cache=cache)
            return thinker.lm_logits(params, out.hidden[:, -1:]), out.cache

        jitted = jax.jit(fn, out_shardings=(batch_spec(3), cache_sh))
        inputs = (params, sds((b, s), jnp.int32, sharding=batch_spec(2)), sds((b, s), jnp.int32, sharding=batch_spec(2)),
                  sds((3, b, s), jnp.float32, sharding=batch_spec(3, 1)))
    elif args.program == "train":
        rt = Runtime(dtype="bfloat16", param_dtype="float32", scan_layers=True, remat="full",
                     expert_parallel=args.expert_parallel, expert_capacity_factor=args.capacity_factor,
                     grouped_matmul_impl=gmm_impl)
        params = abstract_params(specs, jnp.float32)
        params = jax.tree.map(lambda a, sh: sds(a.shape, a.dtype, sharding=sh), params, shardings)
        optimizer = optax.adamw(1e-5, b1=0.9, b2=0.95, weight_decay=0.1)
        # Adam moments take their parameter's sharding; the step count is replicated.
        opt_abstract = jax.eval_shape(optimizer.init, params)
        opt_shardings = optax.tree_map_params(optimizer, lambda _, sh: sh, opt_abstract, shardings,
                                              transform_non_params=lambda _: replicated)
        opt_state = jax.tree.map(lambda a, sh: sds(a.shape, a.dtype, sharding=sh), opt_abstract, opt_shardings)
        top_k = tcfg.text_config.num_experts_per_tok
        num_experts = tcfg.text_config.num_experts

        def loss_fn(params, ids, labels, mask, pos):
            out = thinker.forward(params, ids, mask, pos, tcfg, rt)
            logits = out.logits.astype(jnp.float32)
            valid = labels != -100
            lse = jax.nn.logsumexp(logits, axis=-1)
            picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
            ce = jnp.sum(jnp.where(valid, lse - picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
            # Switch-style load balancing over all layers (the reference's formula, token mask applied). The
            # top-k runs per batch shard: on the global (L, T, E) array XLA all-gathers every token for it.
            axes = sharding.BATCH_AXES

            def shard_stats(router, tok):
                probs = jax.nn.softmax(router.astype(jnp.float32), axis=-1)  # (L, T_shard, E)
                chosen = jax.nn.one_hot(jax.lax.top_k(probs, top_k)[1], num_experts, dtype=jnp.float32).sum(-2)
                return (jax.lax.psum(jnp.sum(chosen * tok, axis=(0, 1)), axes),
                        jax.lax.psum(jnp.sum(probs * tok, axis=(0, 1)), axes), jax.lax.psum(jnp.sum(tok), axes))

            tok = mask.reshape(1, -1, 1).astype(jnp.float32)
            chosen, prob, count = jax.shard_map(
                shard_stats, in_specs=(P(None, axes, None), P(None, axes, None)), out_specs=(P(), P(), P()),
            )(out.router_logits, tok)
            denom = jnp.maximum(count * out.router_logits.shape[0], 1.0)
            aux = num_experts * jnp.sum((chosen / denom) * (prob / denom))
            return ce + 0.001 * aux, (ce, aux)

        def step(params, opt_state, ids, labels, mask, pos):
            (loss, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ids, labels, mask, pos)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, opt_state, {"loss": loss, "ce": ce, "aux": aux, "grad_norm": optax.global_norm(grads)}

        jitted = jax.jit(step, donate_argnums=(0, 1),
                         out_shardings=(shardings, opt_shardings, replicated))
        inputs = (params, opt_state, sds((b, s), jnp.int32, sharding=batch_spec(2)),
                  sds((b, s), jnp.int32, sharding=batch_spec(2)), sds((b, s), jnp.int32, sharding=batch_spec(2)),
                  sds((3, b, s), jnp.float32, sharding=batch_spec(3, 1)))
    else:
        raise ValueError(f"program {args.program!r}")

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = jitted.lower(*inputs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    info.update(
        lower_s=round(t1 - t0, 1), compile_s=round(t2 - t1, 1),
        argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
        alias_bytes=int(m.alias_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes),
        code_bytes=int(getattr(m, "generated_code_size_in_bytes", 0)),
    )
    info["peak_bytes"] = info["argument_bytes"] + info["output_bytes"] - info["alias_bytes"] + info["temp_bytes"]
    # Bytes of the parameters alone on one device (exact, from the shardings).
    per_device = 0
    for a in jax.tree.leaves(inputs[0]):
        shard = a.sharding.shard_shape(a.shape)
        per_device += int(np.prod(shard)) * a.dtype.itemsize
    info["param_bytes"] = per_device
    hlo = compiled.as_text()
    info["collectives"] = {op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(")
                           for op in ("all-to-all", "all-gather", "reduce-scatter", "all-reduce",
                                      "collective-permute")}
    return info


# ------------------------------------------------------------------------------------------- parent
def gib(x) -> str:
    return f"{x / GIB:.2f}"


def fits(peak: float, cap_gib: float) -> str:
    return "yes" if peak <= cap_gib * GIB else "no"


def variant(r: dict) -> str:
    """What differs from the baseline (the model code as on disk, with the kernel stand-ins)."""
    parts = []
    if r.get("slice_expert_layers"):
        parts.append("per-layer expert slice")
    if r.get("capacity_factor"):
        parts.append(f"capacity {r['capacity_factor']}")
    if r.get("expert_parallel") == "none":
        parts.append("EP off")
    if r.get("attention") == "xla":
        parts.append("XLA attention")
    if r.get("grouped_matmul") == "tiled":
        parts.append("CPU tiled gmm")
    return ", ".join(parts) or "baseline"


def short_moe(path: str) -> str:
    return (path.replace("expert-parallel shard_map", "EP shard_map").replace(" exchange", " all-to-all")
            .replace("grouped (XLA-partitioned)", "grouped, XLA-partitioned"))


def table(rows: list[dict], extrapolate_to: int | None = None) -> str:
    lines = ["| program | mesh (data x expert x tensor) | variant | layers | params/dev GiB | args GiB | outputs GiB | "
             "aliased GiB | temps GiB | peak GiB | fits 95 GiB | fits 80 GiB | MoE path | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['program']} | {r['mesh']} | {variant(r)} | {r['layers']} | failed: {r['error'][:120]} |"
                         + " |" * 9)
            continue
        lines.append(
            f"| {r['program']} | {r['mesh']} | {variant(r)} | {r['layers']} | {gib(r['param_bytes'])} | "
            f"{gib(r['argument_bytes'])} | {gib(r['output_bytes'])} | {gib(r['alias_bytes'])} | {gib(r['temp_bytes'])} | "
            f"{gib(r['peak_bytes'])} | {fits(r['peak_bytes'], 95)} | {fits(r['peak_bytes'], 80)} | "
            f"{short_moe(r.get('moe_path', '?'))} | {r['compile_s']} |")
    if extrapolate_to:
        lines += ["", f"Extrapolated to {extrapolate_to} layers (linear in the layer count from the two compiled "
                  "layer counts of each program and mesh; an extrapolation, not a compile):", "",
                  "| program | mesh | variant | from layers | args GiB | temps GiB | peak GiB | fits 95 GiB | fits 80 GiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if "error" not in r:
                groups.setdefault((r["program"], r["mesh"], variant(r)), []).append(r)
        for (program, mesh, var), rs in groups.items():
            rs = sorted(rs, key=lambda r: r["layers"])
            if len(rs) < 2 or rs[0]["layers"] == rs[-1]["layers"]:
                continue
            lo, hi = rs[0], rs[-1]
            out = {}
            for key in ("argument_bytes", "temp_bytes", "peak_bytes"):
                slope = (hi[key] - lo[key]) / (hi["layers"] - lo["layers"])
                out[key] = hi[key] + slope * (extrapolate_to - hi["layers"])
            lines.append(f"| {program} | {mesh} | {var} | {lo['layers']}, {hi['layers']} | {gib(out['argument_bytes'])} | "
                         f"{gib(out['temp_bytes'])} | {gib(out['peak_bytes'])} | {fits(out['peak_bytes'], 95)} | "
                         f"{fits(out['peak_bytes'], 80)} |")
    return "\n".join(lines)


def run_one(args, mesh: str, program: str, layers: int, env: dict) -> dict:
    """Compiles one (mesh, program) in a subprocess; appends its row to --json."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_one", "--mesh", mesh, "--program", program,
           "--layers", str(layers), "--batch", str(args.batch), "--seq", str(args.seq),
           "--attention", args.attention, "--expert-parallel", args.expert_parallel,
           "--grouped-matmul", args.grouped_matmul]
    cmd += ["--slice-expert-layers"] if args.slice_expert_layers else []
    cmd += ["--capacity-factor", str(args.capacity_factor)] if args.capacity_factor else []
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode == 0:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
            row = {"mesh": mesh, "program": program, "layers": layers, "error": tail[0]}
            print(proc.stderr[-3000:], file=sys.stderr)
    except subprocess.TimeoutExpired:
        row = {"mesh": mesh, "program": program, "layers": layers, "error": f"compile did not finish in {args.timeout}s"}
    row["wall_s"] = round(time.perf_counter() - start, 1)
    row["batch"], row["seq"] = args.batch, args.seq
    with open(args.json, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=64, help="simulated CPU devices (default 64)")
    p.add_argument("--meshes", default=DEFAULT_MESHES, help=f"comma-separated DxExT[:fsdp] (default {DEFAULT_MESHES})")
    p.add_argument("--what", default="prefill,train", help="programs: prefill, train (default both)")
    p.add_argument("--batch", type=int, default=64, help="global batch (default 64 sequences)")
    p.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--layers", default="48", help="decoder layer count(s), comma-separated (default 48, the model's)")
    p.add_argument("--extrapolate", type=int, default=None, help="also extrapolate the figures to this layer count")
    p.add_argument("--attention", default="blockwise", choices=["blockwise", "xla"],
                   help="blockwise (default): query-chunked attention standing in for the GPU/TPU flash kernel; "
                        "xla: the CPU path as written (a (S x S) score matrix per head)")
    p.add_argument("--grouped-matmul", default="standin", choices=["standin", "tiled"],
                   help="standin (default): a scan over experts with the Pallas kernels' memory profile; tiled: the "
                        "CPU path as written")
    p.add_argument("--slice-expert-layers", action="store_true",
                   help="bench-side patch: give the expert-parallel shard_map one layer's expert matrices instead "
                        "of the whole stack (without it, FSDP all-gathers every layer's experts at once)")
    p.add_argument("--expert-parallel", default="auto", choices=["auto", "none"],
                   help="Runtime.expert_parallel (default auto: the shard_map path where it applies)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="Runtime.expert_capacity_factor (default: dropless)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per compile (default 3600)")
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "scaleout_results.jsonl"),
                   help="append each result row here (JSON lines)")
    p.add_argument("--all-variants", action="store_true",
                   help="the recorded set: baseline and --slice-expert-layers on the default meshes, capacity 1.25 on "
                        "three, the CPU paths as written (XLA attention, tiled grouped matmul) on one")
    p.add_argument("--table-from", default=None, help="only print the table of an existing JSON-lines file")
    p.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mesh", help=argparse.SUPPRESS)
    p.add_argument("--program", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._one:
        args.layers = int(args.layers)
        print(json.dumps(compile_one(args)), flush=True)
        return 0
    if args.table_from:
        with open(args.table_from) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        print(table(rows, args.extrapolate))
        return 0

    runs = [("", args.meshes)]
    if args.all_variants:
        runs = [("", DEFAULT_MESHES), ("--slice-expert-layers", DEFAULT_MESHES),
                ("--slice-expert-layers --capacity-factor 1.25", "8x8x1:fsdp,8x4x2:fsdp,1x64x1"),
                ("--attention xla --grouped-matmul tiled", "8x8x1:fsdp")]
    rows = []
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={args.devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(x for x in (ROOT, env.get("PYTHONPATH")) if x)
    for extra, meshes in runs:
        run_args = p.parse_args(sys.argv[1:] + extra.split()) if extra else args
        for layers in [int(v) for v in args.layers.split(",")]:
            for mesh in meshes.split(","):
                (d, e, t), _ = parse_mesh(mesh)
                if d * e * t > args.devices:
                    print(f"skip {mesh}: {d * e * t} devices > --devices {args.devices}", file=sys.stderr)
                    continue
                for program in args.what.split(","):
                    rows.append(run_one(run_args, mesh, program, layers, env))
    print(table(rows, args.extrapolate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
