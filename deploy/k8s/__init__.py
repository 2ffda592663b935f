"""Kubernetes manifests for the served model repository, rendered from serving/'s own configuration.

python -m deploy.k8s --repository <generated repository> --out deploy/rendered   # docs/DEPLOY.md
"""
