"""megatron-agpo: AGPO RL post-training on megatron-core with vLLM rollouts."""
