"""Kubernetes manifests derived from the model files and gateway settings (kustomize overlays' generated parts)."""
