"""Batch inference: JSONL requests in, JSONL results out.

    python infer.py --ckpt DIR --requests requests.jsonl --out OUT_DIR [--batch-size N]
                    [--max-new-tokens N] [--greedy] [--no-audio]
    python infer.py                      # embedded default: tiny preset, seeded RANDOM weights

A request line is either pre-tokenized input, {"id": ..., "input_ids": [...]}, or chat messages in
the reference's conversation format, {"id": ..., "messages": [...]}, which needs the checkpoint's
tokenizer.json and chat template. Each result line carries the id, the generated token ids, the text
when a tokenizer is present, and why generation stopped; a request that cannot be served gets an
"error" line and the others go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

BUILTIN_REQUESTS = [
    {"id": "builtin-0", "input_ids": [497, 12, 47, 301, 88, 9, 250, 17, 33, 460, 508, 497, 21]},
    {"id": "builtin-1", "input_ids": [508, 507, 40, 41, 42, 43, 509, 508, 497]},
]


@dataclasses.dataclass
class Request:
    id: str
    line: int
    input_ids: list[int] | None = None
    error: str | None = None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="Hugging Face or omni_jax checkpoint folder (default: --preset with random weights)")
    p.add_argument("--preset", default=None, help="named preset with seeded random weights (default: tiny)")
    p.add_argument("--requests", help="JSONL request file (default: a built-in request)")
    p.add_argument("--out", default="out", help="output folder for results.jsonl (default: ./out)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="parameter/compute dtype (default: bfloat16 for checkpoints, float32 for presets)")
    p.add_argument("--no-audio", action="store_true", help="text output only")
    p.add_argument("--speaker", default="Ethan")
    p.add_argument("--skip-absent-components", action="store_true",
                   help="load a checkpoint even if it holds components its configuration leaves out")
    return p.parse_args(argv)


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


def tokenize_request(obj: dict, assets, vocab: int, where: str) -> list[int]:
    if "input_ids" in obj:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"{where}: input_ids must be a non-empty list of integers")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{where}: input_ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return ids
    if "messages" in obj:
        if assets is None:
            raise ValueError(f"{where}: chat messages need a checkpoint with tokenizer.json; send input_ids instead")
        from omni_jax.processing.prompt import process_messages  # noqa: PLC0415

        inputs = process_messages([obj["messages"]], assets)
        multimodal = [k for k in ("input_features", "pixel_values", "pixel_values_videos") if k in inputs]
        if multimodal:
            raise NotImplementedError(
                f"{where}: audio/image/video content is not supported by this build yet (the encoders are not "
                "implemented); send text-only messages"
            )
        return np.asarray(inputs["input_ids"][0])[np.asarray(inputs["attention_mask"][0]) == 1].tolist()
    raise ValueError(f"{where}: a request needs 'input_ids' or 'messages'")


def load_model(args):
    import jax  # noqa: PLC0415

    import omni_jax  # noqa: PLC0415

    cache_dir = os.environ.get("OMNI_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/omni_jax/xla"))
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    if args.ckpt:
        dtype = args.dtype or "bfloat16"
        model = omni_jax.load_pretrained(args.ckpt, dtype=dtype, skip_absent_components=args.skip_absent_components)
        assets = None
        if os.path.exists(os.path.join(args.ckpt, "tokenizer.json")):
            from omni_jax.processing.prompt import load_text_assets  # noqa: PLC0415

            assets = load_text_assets(args.ckpt)
        return model, assets, f"checkpoint {args.ckpt}"
    name = args.preset or "tiny"
    dtype = args.dtype or "float32"
    config = omni_jax.preset(name)
    model = omni_jax.OmniModel.random(config, seed=args.seed, runtime=omni_jax.Runtime(dtype=dtype, param_dtype=dtype))
    return model, None, f"preset {name!r} with seeded RANDOM weights (seed {args.seed}): the output is meaningless"


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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        print("error: --batch-size and --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        raw_requests = read_requests(args.requests)
        model, assets, what = load_model(args)
    except Exception as e:  # noqa: BLE001 - report any start-up failure plainly
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"omni_jax infer: {what}", file=sys.stderr)
    if not args.no_audio:
        print("note: speech output is not implemented in this build; writing text only", file=sys.stderr)

    vocab = model.config.text.vocab_size
    context = model.config.text.max_position_embeddings
    requests: list[Request] = []
    for obj in raw_requests:
        if isinstance(obj, Request):
            requests.append(obj)
            continue
        line = obj.pop("_line")
        where = f"{args.requests or '<built-in>'}:{line}"
        req = Request(id=str(obj.get("id", f"line-{line}")), line=line)
        try:
            req.input_ids = tokenize_request(obj, assets, vocab, where)
            if len(req.input_ids) + args.max_new_tokens > context:
                raise ValueError(
                    f"{where}: prompt of {len(req.input_ids)} tokens + {args.max_new_tokens} new tokens exceeds the "
                    f"model's context of {context}"
                )
        except Exception as e:  # noqa: BLE001 - one bad request must not lose the others
            req.error = str(e)
        requests.append(req)

    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.jsonl")
    sampling = sampling_kwargs(args, args.ckpt)
    eos = model.config.im_end_token_id
    results: dict[int, dict] = {}
    good = [r for r in requests if r.error is None]
    for r in requests:
        if r.error is not None:
            results[r.line] = {"id": r.id, "error": r.error}

    from tqdm import tqdm  # noqa: PLC0415

    start = time.perf_counter()
    generated_tokens = 0
    with tqdm(total=len(good), unit="req", desc="generating", file=sys.stderr) as bar:
        for i in range(0, len(good), args.batch_size):
            batch = good[i : i + args.batch_size]
            width = max(len(r.input_ids) for r in batch)
            ids = np.zeros((len(batch), width), np.int32)
            mask = np.zeros((len(batch), width), np.int32)
            for row, r in enumerate(batch):
                ids[row, width - len(r.input_ids):] = r.input_ids
                mask[row, width - len(r.input_ids):] = 1
            try:
                out = model.generate(ids, mask, max_new_tokens=args.max_new_tokens, seed=args.seed + i,
                                     eos_token_id=eos, **sampling)
            except Exception as e:  # noqa: BLE001
                for r in batch:
                    results[r.line] = {"id": r.id, "error": f"generation failed: {e}"}
                bar.update(len(batch))
                continue
            for row, r in enumerate(batch):
                n = int(out.num_generated[row])
                new = out.sequences[row, width : width + n].tolist()
                generated_tokens += n
                result = {
                    "id": r.id,
                    "prompt_tokens": len(r.input_ids),
                    "generated_ids": new,
                    "finish_reason": "eos" if new and new[-1] == eos else "length",
                }
                if assets is not None:
                    result["text"] = assets.tokenizer.decode(new, skip_special_tokens=True)
                results[r.line] = result
            bar.update(len(batch))
    elapsed = time.perf_counter() - start
    with open(results_path, "w") as f:
        for line in sorted(results):
            f.write(json.dumps(results[line]) + "\n")
    failed = sum(1 for r in results.values() if "error" in r)
    print(
        f"wrote {len(results)} results ({failed} failed) to {results_path}; {generated_tokens} tokens in "
        f"{elapsed:.1f}s (compilation included)",
        file=sys.stderr,
    )
    for r in results.values():
        if "error" in r:
            print(f"  {r['id']}: {r['error']}", file=sys.stderr)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
