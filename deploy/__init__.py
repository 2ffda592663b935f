"""Deployment beyond one machine: the NGC Triton image (Dockerfile), its HTTP front (sidecar.py) and
Kubernetes manifests rendered from the served repository (`python -m deploy.k8s`; docs/DEPLOY.md)."""
