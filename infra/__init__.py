"""Deployment files for lofit-ray (Kubernetes manifests, Dockerfile) and their linter, `python -m infra.lint`."""
