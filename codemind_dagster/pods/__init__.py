"""Entry points of the platform's own pods: what runs inside a Kubernetes pod in the k8s profile."""
