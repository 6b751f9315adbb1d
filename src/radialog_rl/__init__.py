"""radialog-rl: RaDialog (LLaVA-1.5 + BioViL-T) loading, adaptation, SFT, multimodal PPO and
confidence calibration.

Public names are exported lazily (importing this package imports neither torch nor transformers,
and nothing here touches the network): ``from radialog_rl import load_baseline_llava_model_with_vision_modules``
imports only the module that defines it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # errors and constants
    "RadialogError": "radialog_rl.errors",
    "CheckpointError": "radialog_rl.errors",
    "OfflineError": "radialog_rl.errors",
    "ConfigError": "radialog_rl.errors",
    "DataError": "radialog_rl.errors",
    "ImageError": "radialog_rl.errors",
    "IMAGE_TOKEN_INDEX": "radialog_rl.constants",
    "IGNORE_INDEX": "radialog_rl.constants",
    # prompts
    "SYSTEM_PROMPT": "radialog_rl.data.prompts",
    "report_prompt": "radialog_rl.data.prompts",
    "build_prompt": "radialog_rl.data.prompts",
    "render_conversation": "radialog_rl.data.prompts",
    "format_findings": "radialog_rl.data.prompts",
    # model
    "LlavaLlamaConfig": "radialog_rl.modeling.llava",
    "LlavaLlamaForCausalLM": "radialog_rl.modeling.llava",
    "expand_image_tokens": "radialog_rl.modeling.llava",
    "BioViLConfig": "radialog_rl.modeling.biovil",
    "BioViLTImageEncoder": "radialog_rl.modeling.biovil",
    "build_mm_projector": "radialog_rl.modeling.projector",
    # loading (each step of the baseline loader is public)
    "load_baseline_llava_model_with_vision_modules": "radialog_rl.loading.release",
    "load_llava_config": "radialog_rl.loading.release",
    "reset_mm_projector_to_fix_wrong_shape": "radialog_rl.loading.release",
    "load_non_lora_trainables": "radialog_rl.loading.release",
    "merge_llm_with_vision_tower": "radialog_rl.loading.release",
    "load_vision_tower_weights": "radialog_rl.loading.release",
    "resize_embeddings_to_tokenizer": "radialog_rl.loading.release",
    "load_biovil_t_state_dict": "radialog_rl.loading.release",
    "modify_model_for_image_input": "radialog_rl.loading.release",
    "LoadingInfo": "radialog_rl.loading.release",
    "load_release": "radialog_rl.loading.release",
    "load_model": "radialog_rl.loading.bundle",
    "ModelSpec": "radialog_rl.loading.bundle",
    "LoadedModel": "radialog_rl.loading.bundle",
    "ImageSizes": "radialog_rl.data.images",
    "unwrap_llava": "radialog_rl.modeling.llava",
    "load_tensor_file": "radialog_rl.loading.files",
    "resolve_model_dir": "radialog_rl.loading.files",
    "load_state_dict_checked": "radialog_rl.loading.keys",
    "KeyReport": "radialog_rl.loading.keys",
    "precision_spec": "radialog_rl.loading.precision",
    # tokenizer
    "load_pretrained_text_only_llava_tokenizer": "radialog_rl.loading.tokenizer",
    "load_pretrained_llava_tokenizer_with_image_support": "radialog_rl.loading.tokenizer",
    "modify_tokenizer_for_image_input": "radialog_rl.loading.tokenizer",
    "tokenizer_image_token": "radialog_rl.loading.tokenizer",
    "batch_tokenize_image_prompts": "radialog_rl.loading.tokenizer",
    # adapters, value head, entry points, merge/export
    "radialog_lora_config": "radialog_rl.loading.adapters",
    "attach_lora": "radialog_rl.loading.adapters",
    "read_adapter": "radialog_rl.loading.adapters",
    "load_lora_weights": "radialog_rl.loading.adapters",
    "freeze_all_non_lora_params": "radialog_rl.loading.adapters",
    "trainable_parameter_report": "radialog_rl.loading.adapters",
    "prepare_quantized_for_training": "radialog_rl.loading.adapters",
    "add_value_head_to_LlavaLlamaForCausalLM_model": "radialog_rl.loading.adapters",
    "load_value_head": "radialog_rl.loading.adapters",
    "save_value_head_model": "radialog_rl.loading.adapters",
    "load_pretrained_llava_model_for_sft_training": "radialog_rl.loading.entry_points",
    "load_pretrained_llava_model_for_ppo_training": "radialog_rl.loading.entry_points",
    "load_pretrained_llava_model_for_ppo_training_with_fresh_lora_adapters": "radialog_rl.loading.entry_points",
    "save_lora_merged_llava_model_to_local_dir": "radialog_rl.loading.export",
    "LlavaWithValueHead": "radialog_rl.modeling.value_head",
    # calibration, images, PPO
    "parse_confidence": "radialog_rl.calibration.parsing",
    "find_confidence_span": "radialog_rl.calibration.parsing",
    "parse_yes_no": "radialog_rl.calibration.parsing",
    "replace_confidences": "radialog_rl.calibration.parsing",
    "binary_qa_loglik_reward": "radialog_rl.calibration.rewards",
    "continuous_loglik_reward": "radialog_rl.calibration.rewards",
    "quadratic_blend_reward": "radialog_rl.calibration.rewards",
    "get_reward": "radialog_rl.calibration.rewards",
    "load_reward": "radialog_rl.calibration.rewards",
    "RewardOutput": "radialog_rl.calibration.rewards",
    "compute_calibration": "radialog_rl.calibration.metrics",
    "expected_calibration_error": "radialog_rl.calibration.metrics",
    "sigma_cbnd": "radialog_rl.calibration.metrics",
    "d_nckl": "radialog_rl.calibration.metrics",
    "brier_score": "radialog_rl.calibration.metrics",
    "confidence_auroc": "radialog_rl.calibration.metrics",
    "CalibrationReport": "radialog_rl.calibration.metrics",
    "reliability_diagram": "radialog_rl.calibration.plots",
    "confidence_histogram": "radialog_rl.calibration.plots",
    "qa_prompt": "radialog_rl.calibration.prompts",
    "report_confidence_prompt": "radialog_rl.calibration.prompts",
    "qa_sft_target": "radialog_rl.calibration.prompts",
    "report_sft_target": "radialog_rl.calibration.prompts",
    "read_predictions": "radialog_rl.calibration.io",
    # report accuracy scorers (GREEN over an OpenAI-compatible server, unigram F1)
    "build_scorer": "radialog_rl.scoring",
    "GreenScorer": "radialog_rl.scoring.green",
    "UnigramF1Scorer": "radialog_rl.scoring.lexical",
    "ReportScorer": "radialog_rl.scoring.base",
    "load_chest_xray": "radialog_rl.data.images",
    "load_chest_xrays": "radialog_rl.data.images",
    "preprocess_chest_xray": "radialog_rl.data.images",
    "collect_image_paths": "radialog_rl.data.images",
    "make_synthetic_chest_xray": "radialog_rl.data.images",
    # synthetic visual calibration task and its reference confidences
    "build_synthetic_task": "radialog_rl.data.synthetic_task",
    "oracle_confidences": "radialog_rl.calibration.baselines",
    "best_constant_confidence": "radialog_rl.calibration.baselines",
    "PPOConfig": "radialog_rl.training.ppo.config",
    "load_ppo_config": "radialog_rl.training.ppo.config",
    "PPOTrainer": "radialog_rl.training.ppo.trainer",
    "generate": "radialog_rl.generation",
    "generate_reports": "radialog_rl.generation",
    "GenerationResult": "radialog_rl.generation",
    "encode_image_features": "radialog_rl.generation",
    "SFTConfig": "radialog_rl.training.sft",
    "load_sft_config": "radialog_rl.training.sft",
    "run_sft": "radialog_rl.training.sft",
    # confidence estimation from a model (verbalized, P(True), sequence probability, probe)
    "estimate_confidence": "radialog_rl.confidence.estimate",
    "EstimateConfig": "radialog_rl.confidence.estimate",
    "train_probe": "radialog_rl.confidence.estimate",
    "ConfidenceProbe": "radialog_rl.confidence.probe",
    "ConfidenceResult": "radialog_rl.confidence.base",
    "load_labelled_jsonl": "radialog_rl.confidence.samples",
    # MIMIC-CXR-JPG dataset builders
    "build_binary_qa": "radialog_rl.data.mimic",
    "build_report_generation": "radialog_rl.data.mimic",
    "build_master_table": "radialog_rl.data.mimic",
    "write_master_table": "radialog_rl.data.mimic",
    "MimicError": "radialog_rl.data.mimic",
    # tiny release and synthetic data for tests and demos
    "make_synthetic_mimic": "radialog_rl.testing.mimic",
    "make_tiny_release": "radialog_rl.testing.tiny",
    "TinyRelease": "radialog_rl.testing.tiny",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'radialog_rl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
