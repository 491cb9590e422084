"""Search-ads relevance: annotation at scale (`agpo-annotate`), the student cross-encoder,
and their metrics. The data and the reward live in `megatron_agpo.data.relevance` and
`megatron_agpo.rewards.relevance`."""
