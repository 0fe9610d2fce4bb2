"""Ray: Ray Serve replicas of a model file, and the cluster checks for vLLM's Ray executor."""
