"""Configs: both rope serialisations, config.json values over class defaults, presets, round trip."""

import json

import pytest

from omni_jax.config import ConfigError, OmniConfig, Runtime, ThinkerTextConfig, load_config, preset


def _text(**extra):
    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    base.update(extra)
    return base


def test_rope_parameters_of_transformers_5():
    cfg = ThinkerTextConfig.from_hf_dict(_text(rope_parameters={
        "rope_type": "default", "rope_theta": 5e5, "mrope_section": [2, 1, 1], "interleaved": True}))
    assert cfg.rope_theta == 5e5 and cfg.mrope_section == (2, 1, 1)


def test_rope_scaling_of_transformers_4_57():
    cfg = ThinkerTextConfig.from_hf_dict(_text(rope_theta=5e5, rope_scaling={
        "type": "default", "mrope_section": [2, 1, 1], "interleaved": True, "mrope_interleaved": True}))
    assert cfg.rope_theta == 5e5 and cfg.mrope_section == (2, 1, 1)


def test_config_json_values_win_over_class_defaults():
    raw = {"thinker_config": {"position_id_per_seconds": 13, "audio_start_token_id": 151669,
                              "text_config": _text(rope_parameters={"rope_theta": 1e6, "mrope_section": [2, 1, 1]})},
           "talker_config": {"accept_hidden_layer": 24, "num_code_groups": 16,
                             "speaker_id": {"Ethan": 2302, "chelsie": 2301},
                             "text_config": {"num_experts": 8, "num_experts_per_tok": 6, "norm_topk_prob": True}},
           "enable_audio_output": True}
    cfg = OmniConfig.from_hf_dict(raw)
    assert cfg.thinker_config.position_id_per_seconds == 13  # class default is a stale 25
    assert cfg.thinker_config.audio_start_token_id == 151669
    assert cfg.talker_config.accept_hidden_layer == 24
    assert cfg.talker_config.num_code_groups == 16
    assert dict(cfg.talker_config.speaker_id) == {"ethan": 2302, "chelsie": 2301}
    assert cfg.talker_config.text_config.norm_topk_prob is True
    # Omitted keys take the reference class defaults.
    assert cfg.thinker_config.audio_config.output_dim == 3584


def test_disabled_audio_output_builds_no_talker():
    text = _text(rope_parameters={"mrope_section": [2, 1, 1]})
    cfg = OmniConfig.from_hf_dict({"enable_audio_output": False, "thinker_config": {"text_config": text}})
    assert cfg.talker_config is None and cfg.code2wav_config is None


def test_real_preset_matches_the_published_checkpoint():
    cfg = preset("qwen3-omni-30b-a3b-instruct")
    t = cfg.text
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (48, 2048, 32, 4, 128)
    assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size, t.vocab_size) == (128, 8, 768, 152064)
    assert t.mrope_section == (24, 20, 20) and t.rope_theta == 1e6
    assert cfg.talker_config.text_config.num_experts_per_tok == 6
    assert cfg.talker_config.codec_eos_token_id == 2150
    assert preset("qwen3-omni-30b-a3b-thinking").talker_config is None


def test_hf_round_trip_and_transformers_accepts_it(tmp_path):
    cfg = preset("tiny")
    again = OmniConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert again == cfg
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert load_config(tmp_path) == cfg
    from convert.reference import hf_config

    hf = hf_config(cfg)
    assert hf.thinker_config.text_config.rope_parameters["mrope_section"] == list(cfg.text.mrope_section)
    assert hf.thinker_config.position_id_per_seconds == 13


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'; valid presets: .*tiny"):
        preset("nope")
    with pytest.raises(ConfigError, match="mrope_section"):
        ThinkerTextConfig.from_hf_dict(_text(rope_parameters={"mrope_section": [3, 3, 3]}))
    with pytest.raises(ConfigError, match="model_type='llama'"):
        OmniConfig.from_hf_dict({"model_type": "llama"})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="moe_impl"):
        Runtime(moe_impl="fast")
