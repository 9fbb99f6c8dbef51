"""infer.py end to end, through the command line, as a user runs it."""

import json
import os
import subprocess
import sys

import omni_jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_infer(*args, cwd):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    return proc


def run_python(code, cwd):
    cache = os.environ.get("OMNI_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/omni_jax/xla"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=cache))
    assert proc.returncode == 0, proc.stderr
    return proc


def read_results(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "results.jsonl"))]


def test_embedded_default_runs_and_says_weights_are_random(tmp_path):
    proc = run_infer(cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM weights" in proc.stderr
    results = read_results(tmp_path / "out")
    assert [r["id"] for r in results] == ["builtin-0", "builtin-1"]
    assert all(len(r["generated_ids"]) >= 1 for r in results)
    # The tiny preset has a talker and Code2Wav: one wav per request (noise from random weights).
    import soundfile

    for r in results:
        info = soundfile.info(str(tmp_path / "out" / r["audio"]))
        assert info.samplerate == r["sample_rate"] == 24000 and info.frames == r["audio_samples"] > 0


def test_bad_requests_are_reported_and_the_others_served(tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join([
        json.dumps({"id": "ok", "input_ids": [1, 2, 3, 4]}),
        "{not json",
        json.dumps({"id": "out-of-vocab", "input_ids": [1, 99999]}),
        json.dumps({"id": "too-long", "input_ids": [5] * 4090}),
        json.dumps({"id": "chat-without-tokenizer", "messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"id": "empty"}),
        json.dumps({"id": "ok2", "input_ids": [7, 8]}),
    ]) + "\n")
    proc = run_infer("--requests", str(requests), "--out", str(tmp_path / "res"), "--greedy",
                     "--max-new-tokens", "8", "--batch-size", "2", cwd=tmp_path)
    assert proc.returncode == 1  # some requests failed
    results = {r["id"]: r for r in read_results(tmp_path / "res")}
    assert len(results["ok"]["generated_ids"]) == 8 and len(results["ok2"]["generated_ids"]) == 8
    assert "requests.jsonl:2: malformed JSON line" in results["line-2"]["error"]
    assert "outside the vocabulary" in results["out-of-vocab"]["error"]
    assert "exceeds the model's context" in results["too-long"]["error"]
    assert "tokenizer.json" in results["chat-without-tokenizer"]["error"]
    assert "needs 'input_ids' or 'messages'" in results["empty"]["error"]


def test_greedy_results_equal_the_python_api(tmp_path):
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"id": "a", "input_ids": [3, 1, 4, 1, 5, 9, 2, 6]}) + "\n")
    proc = run_infer("--requests", str(requests), "--out", str(tmp_path), "--greedy", "--max-new-tokens", "6",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # The Python API in its own process, with infer.py's compilation cache (the tiny model's programs are
    # then compiled once for both).
    api = run_python(
        "import json, omni_jax\n"
        "model = omni_jax.OmniModel.random(omni_jax.preset('tiny'), seed=0,\n"
        "    runtime=omni_jax.Runtime(dtype='float32', param_dtype='float32'))\n"
        "out = model.generate([[3, 1, 4, 1, 5, 9, 2, 6]], max_new_tokens=6)\n"
        "print(json.dumps(out.sequences[0, 8 : 8 + out.num_generated[0]].tolist()))\n", cwd=tmp_path)
    assert read_results(tmp_path)[0]["generated_ids"] == json.loads(api.stdout.splitlines()[-1])


def test_start_up_errors_exit_2_with_a_message(tmp_path):
    proc = run_infer("--requests", str(tmp_path / "missing.jsonl"), cwd=tmp_path)
    assert proc.returncode == 2 and "missing.jsonl" in proc.stderr and "does not exist" in proc.stderr
    proc = run_infer("--preset", "gigantic", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown preset 'gigantic'" in proc.stderr
    proc = run_infer("--ckpt", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_infer("--speaker", "Nobody", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown speaker 'Nobody'; valid speakers: aiden, chelsie, ethan" in proc.stderr


def _word_tokenizer(path, extra_tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["hello", "world", "how", "are", "you", "user", "assistant", "system", "\n", "?", "!"]
    vocab = {w: i for i, w in enumerate(words)}
    for token, token_id in extra_tokens.items():
        vocab[token] = token_id
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(r"(<\|[a-z_]+\|>|\n|\s+)", behavior="isolated")
    tok.add_special_tokens(list(extra_tokens))
    tok.save(str(path))


def test_chat_messages_with_a_checkpoint_tokenizer(tmp_path):
    config = omni_jax.preset("tiny").replace(talker_config=None, code2wav_config=None, enable_audio_output=False)
    ckpt = tmp_path / "ckpt"
    run_python(  # a Thinking-like checkpoint: no talker, no Code2Wav
        "import jax, omni_jax\nfrom omni_jax import checkpoint\n"
        "config = omni_jax.preset('tiny').replace(talker_config=None, code2wav_config=None,\n"
        "                                         enable_audio_output=False)\n"
        "model = omni_jax.OmniModel.random(config, seed=3, runtime=omni_jax.Runtime(dtype='float32', "
        "param_dtype='float32'))\n"
        f"checkpoint.save_params({str(ckpt)!r}, jax.device_get(model.params), config, 'float32')\n", cwd=tmp_path)
    _word_tokenizer(ckpt / "tokenizer.json", {"<|im_start|>": config.im_start_token_id,
                                              "<|im_end|>": config.im_end_token_id, "<|endoftext|>": 0})
    (ckpt / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    requests = tmp_path / "chat.jsonl"
    chat = [{"role": "user", "content": [{"type": "text", "text": "hello world how are you"}]}]
    requests.write_text(json.dumps({"id": "chat", "messages": chat}) + "\n"
                        + json.dumps({"id": "wants-speech", "speaker": "Ethan", "messages": chat}) + "\n")
    proc = run_infer("--ckpt", str(ckpt), "--requests", str(requests), "--out", str(tmp_path / "o"), "--greedy",
                     "--max-new-tokens", "5", "--dtype", "float32", cwd=tmp_path)
    # No talker: text only, said once; a request that asks for a voice is an error, the other is served.
    assert proc.returncode == 1, proc.stderr
    assert "no talker/Code2Wav" in proc.stderr and "writing text only" in proc.stderr
    result, refused = read_results(tmp_path / "o")
    assert "has no talker" in refused["error"] and "--no-audio" in refused["error"]
    assert "audio" not in result and not [f for f in os.listdir(tmp_path / "o") if f.endswith(".wav")]
    proc = run_infer("--ckpt", str(ckpt), "--requests", str(requests), "--speaker", "Ethan", cwd=tmp_path)
    assert proc.returncode == 2 and "has no talker" in proc.stderr
    from tokenizers import Tokenizer

    rendered = "<|im_start|>user\nhello world how are you<|im_end|>\n<|im_start|>assistant\n"
    expected_ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(rendered).ids
    assert config.im_start_token_id in expected_ids
    assert result["prompt_tokens"] == len(expected_ids)
    assert isinstance(result["text"], str) and len(result["generated_ids"]) == 5
