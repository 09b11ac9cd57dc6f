"""Dense -> MoE upcycling: read released dense weights, turn chosen FFNs into experts, prove nothing broke.

  read_dense(path)            a Switchyard checkpoint dir, a Hugging Face dir or a .gguf file -> DenseSource
  upcycle(dense, UpcycleConfig(recipe=...))   copy | noise | granular | shared | drop   -> MoE Transformer
  step0_check(dense, moe, tokens, ...)        max |Δ logit|, both losses, exact or not -> StepZeroReport
  export_hf(model, dir)                       Mixtral / Llama / Qwen2 / GPT-2 Hugging Face checkpoints

Imports only moe and routing (plus the optional gguf, tokenizers and safetensors packages).
"""
from upcycle.recipes import RECIPES, UpcycleConfig, down_factor, exactness, upcycle, upcycled_config
from upcycle.source import DenseSource, read_dense
from upcycle.verify import StepZeroReport, sample_tokens, step0_check

__all__ = ["RECIPES", "UpcycleConfig", "down_factor", "exactness", "upcycle", "upcycled_config", "DenseSource",
           "read_dense", "StepZeroReport", "sample_tokens", "step0_check"]
